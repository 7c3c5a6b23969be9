"""Dashboard pages (HTML, staff login) and the small JSON reads they need."""

from django.urls import path

from monitoring import views

urlpatterns = [
    path("", views.dashboard_index, name="dashboard"),
    path("dashboard/trainings/new/", views.training_new, name="dashboard-training-new"),
    path("dashboard/trainings/<uuid:training_id>/", views.training_page, name="dashboard-training"),
    path(
        "dashboard/trainings/<uuid:training_id>/tables/",
        views.training_tables,
        name="dashboard-training-tables",
    ),
    path(
        "dashboard/trainings/<uuid:training_id>/rounds.json",
        views.training_rounds_json,
        name="dashboard-training-rounds",
    ),
    path(
        "dashboard/trainings/<uuid:training_id>/start/",
        views.training_start_view,
        name="dashboard-training-start",
    ),
    path(
        "dashboard/trainings/<uuid:training_id>/versions/",
        views.versions_page,
        name="dashboard-versions",
    ),
    path("dashboard/compare/", views.compare_page, name="dashboard-compare"),
    path("dashboard/compare.csv", views.compare_csv, name="dashboard-compare-csv"),
    path("dashboard/alerts/", views.alerts_page, name="dashboard-alerts"),
    path("dashboard/health/", views.health_page, name="dashboard-health"),
    path("dashboard/agents/", views.agents_page, name="dashboard-agents"),
    path("dashboard/agents/<str:agent_id>/", views.agent_page, name="dashboard-agent"),
    # not under agents/: "dashboard/agents/<agent_id>/" would shadow it (or it would shadow an agent)
    path("dashboard/enrolment/", views.enrolment_page, name="dashboard-enrolment"),
]
