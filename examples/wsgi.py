"""WSGI entry point for gunicorn: ``gunicorn -c examples/gunicorn.conf.py examples.wsgi:app``."""

from examples.signup_app import create_app

app = create_app()
