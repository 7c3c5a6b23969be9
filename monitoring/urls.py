"""Dashboard pages (HTML)."""

from django.urls import path

from monitoring import views

urlpatterns = [
    path("", views.dashboard_index, name="dashboard"),
    path("dashboard/trainings/<uuid:training_id>/", views.training_page, name="dashboard-training"),
]
