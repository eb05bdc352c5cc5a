"""The WSGI entry point for gunicorn: ``gunicorn -c conf/gunicorn.conf.py wsgi:app``.

The configuration is found as usual: ``$ASPY_CONFIG``, else ``~/.config/aspy/config.toml``.
Under conf/gunicorn.conf.py each worker serves what gunicorn's master accepted, so a file
changed with mistakes before a reload never reaches a worker.
"""
from aspy import create_app
from aspy.serving import accepted_configuration

config, models = accepted_configuration()
app = create_app(config, models=models)
