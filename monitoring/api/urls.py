"""Monitoring resources under ``/api/v1/`` (included before the router, so ``agents/leaderboard`` is not
read as an agent named "leaderboard"); a trailing slash is optional, as on the router's routes."""

from django.urls import re_path

from monitoring.api import views

urlpatterns = [
    re_path(
        r"^trainings/(?P<training_id>[^/]+)/anomalies/?$",
        views.training_anomalies_view,
        name="training-anomalies",
    ),
    re_path(
        r"^trainings/(?P<training_id>[^/]+)/leaderboard/?$",
        views.training_leaderboard_view,
        name="training-leaderboard",
    ),
    re_path(r"^agents/leaderboard/?$", views.agents_leaderboard_view, name="agents-leaderboard"),
]
