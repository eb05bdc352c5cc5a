"""The WSGI entry point for gunicorn: ``gunicorn -c conf/gunicorn.conf.py wsgi:app``.

The configuration is found as usual: ``$ASPY_CONFIG``, else ``~/.config/aspy/config.toml``.
"""
from aspy import create_app

app = create_app()
