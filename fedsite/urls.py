"""URL map: the seed's REST paths, the agent protocol v1, DRF resources, schema, admin, metrics."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from clients.api.views import AgentViewSet, EnrollView, HeartbeatView, IdentityKeyView
from fedsite import api_docs
from fedsite.operator_views import OperatorLoginView, OperatorLogoutAllView, OperatorLogoutView
from monitoring.api import views as monitoring_views
from monitoring.prometheus import metrics_view
from privacy.api.views import training_privacy
from trainings.api import agent_views, secagg_views
from trainings.api import views as training_views
from versioning.api import views as versioning_views
from versioning.api.views import ModelVersionViewSet

router = DefaultRouter(trailing_slash=True)
router.register("trainings", training_views.TrainingViewSet, basename="training")
router.register("rounds", training_views.RoundViewSet, basename="round")
router.register("agents", AgentViewSet, basename="agent")
router.register("versions", ModelVersionViewSet, basename="version")

agent_protocol = [
    path("enroll", EnrollView.as_view(), name="agent-enroll"),
    path("heartbeat", HeartbeatView.as_view(), name="agent-heartbeat"),
    path("identity-key", IdentityKeyView.as_view(), name="agent-identity-key"),
    path("tasks/<str:task_id>/secagg", secagg_views.SecAggSubmitView.as_view(), name="agent-secagg"),
    path("tasks/next", agent_views.next_task_view, name="agent-next-task"),
    path("tasks/<str:task_id>/update", agent_views.UpdateUploadView.as_view(), name="agent-update"),
    path("tasks/<str:task_id>/fail", agent_views.TaskFailView.as_view(), name="agent-task-fail"),
    path("models/<str:version_id>", agent_views.ModelDownloadView.as_view(), name="agent-model"),
]

seed_api = [
    path("health", training_views.health, name="seed-health"),
    path("training/start", training_views.training_start, name="seed-training-start"),
    path(
        "training/<str:training_id>/status", training_views.training_status_view, name="seed-training-status"
    ),
    path("training/<str:training_id>/stop", training_views.training_stop, name="seed-training-stop"),
    path("training/<str:training_id>/metrics", training_views.training_metrics, name="seed-training-metrics"),
    path("system/health", monitoring_views.system_health_view, name="seed-system-health"),
    path("system/health/history", monitoring_views.system_health_history_view, name="system-health-history"),
    path("alerts", monitoring_views.alerts_view, name="seed-alerts"),
    path("alerts/acknowledge", monitoring_views.alerts_acknowledge_view, name="alerts-acknowledge"),
    path(
        "alerts/<int:alert_id>/acknowledge", monitoring_views.alert_acknowledge_view, name="alert-acknowledge"
    ),
    path("trainings/<str:training_id>/privacy", training_privacy, name="training-privacy"),
]

operator_auth = [
    path("login", OperatorLoginView.as_view(), name="operator-login"),
    path("logout", OperatorLogoutView.as_view(), name="operator-logout"),
    path("logoutall", OperatorLogoutAllView.as_view(), name="operator-logout-all"),
]

urlpatterns = [
    path("api/", include(seed_api)),
    path("api/v1/agent/", include(agent_protocol)),
    path("api/v1/auth/", include(operator_auth)),
    path(
        "api/v1/trainings/<str:training_id>/versions/compare",
        versioning_views.training_versions_compare,
        name="training-versions-compare",
    ),
    path(
        "api/v1/trainings/<str:training_id>/rollback",
        versioning_views.training_rollback_view,
        name="training-rollback",
    ),
    path("api/v1/", include("monitoring.api.urls")),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("api/redoc-dist/bundles/redoc.standalone.js", api_docs.redoc_bundle, name="redoc-bundle"),
    path("favicon.ico", RedirectView.as_view(url=static("monitoring/favicon.svg"), permanent=True)),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="prometheus-django-metrics"),
    path("", include("monitoring.urls")),
]

handler400 = "fedsite.error_views.bad_request"
handler403 = "fedsite.error_views.permission_denied"
handler404 = "fedsite.error_views.page_not_found"
handler500 = "fedsite.error_views.server_error"
