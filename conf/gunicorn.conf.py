"""gunicorn settings for aspy behind nginx: ``gunicorn -c conf/gunicorn.conf.py wsgi:app``.

The values come from ``[server]`` in config.toml (found through ``$ASPY_CONFIG``), by the
same function ``aspy serve`` uses. Only aspy's config reader is imported here, never the
app: each gevent worker must patch the standard library before the app loads. A config with
mistakes stops the start with the message; on a reload (HUP) the running configuration stays.
"""
from aspy.serving import gunicorn_conf_settings

globals().update(gunicorn_conf_settings())
wsgi_app = "wsgi:app"
