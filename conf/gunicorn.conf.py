"""gunicorn settings for aspy behind nginx: ``gunicorn -c conf/gunicorn.conf.py wsgi:app``.

The values come from ``[server]`` in config.toml (found through ``$ASPY_CONFIG``), by the
same function ``aspy serve`` uses. Only aspy's config reader is imported here, never the
app: each gevent worker must patch the standard library before the app loads.
"""
from aspy.config import load_config
from aspy.serving import gunicorn_settings

globals().update(gunicorn_settings(load_config().server))
wsgi_app = "wsgi:app"
