"""The project's URLs plus two views that fail, to see what an unhandled exception answers."""

from django.urls import path

from fedsite.urls import handler400, handler403, handler404, handler500, urlpatterns  # noqa: F401


def _fail(request):
    raise RuntimeError("a bug")


urlpatterns = [path("api/v1/broken", _fail), path("dashboard/broken", _fail), *urlpatterns]
