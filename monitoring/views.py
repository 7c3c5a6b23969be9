"""Dashboard pages."""

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse


@staff_member_required
def dashboard_index(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"dashboard": "under construction"})


@staff_member_required
def training_page(request: HttpRequest, training_id: str) -> HttpResponse:
    return JsonResponse({"training": str(training_id)})
