"""Monitoring resources under ``/api/v1/`` (included before the router). No trailing slash, like the other
training sub-resources, except that ``agents/leaderboard`` takes one too: the router's agent detail route
(``agents/<agent_id>/``) would otherwise read ``agents/leaderboard/`` as an agent named "leaderboard"
(which is why that agent id is reserved in ``clients.services``)."""

from django.urls import path, re_path

from monitoring.api import views

urlpatterns = [
    path("trainings/<str:training_id>/anomalies", views.training_anomalies_view, name="training-anomalies"),
    path(
        "trainings/<str:training_id>/leaderboard",
        views.training_leaderboard_view,
        name="training-leaderboard",
    ),
    re_path(r"^agents/leaderboard/?\Z", views.agents_leaderboard_view, name="agents-leaderboard"),
]
