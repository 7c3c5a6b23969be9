"""fedsite: the Django project (settings, urls, ASGI routing, Celery app)."""

from fedsite.celery import app as celery_app

__all__ = ("celery_app",)
