"""Monitoring resources under ``/api/v1/`` (included before the router, so ``agents/leaderboard`` is not
read as an agent named "leaderboard"); no trailing slash, like the other training sub-resources."""

from django.urls import path

from monitoring.api import views

urlpatterns = [
    path("trainings/<str:training_id>/anomalies", views.training_anomalies_view, name="training-anomalies"),
    path(
        "trainings/<str:training_id>/leaderboard",
        views.training_leaderboard_view,
        name="training-leaderboard",
    ),
    path("agents/leaderboard", views.agents_leaderboard_view, name="agents-leaderboard"),
]
