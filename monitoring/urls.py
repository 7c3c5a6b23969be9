"""Dashboard pages (HTML, staff login)."""

from django.urls import path

from monitoring import views

urlpatterns = [
    path("", views.dashboard_index, name="dashboard"),
    path("dashboard/trainings/<uuid:training_id>/", views.training_page, name="dashboard-training"),
    path(
        "dashboard/trainings/<uuid:training_id>/tables/",
        views.training_tables,
        name="dashboard-training-tables",
    ),
    path("dashboard/agents/", views.agents_page, name="dashboard-agents"),
]
