"""ReDoc's bundle, served so that it never reaches out to the Internet.

The bundle shipped by drf-spectacular-sidecar draws the Redocly logo in its menu from
``https://cdn.redoc.ly/``, with no option to turn it off. This view serves the same file with that one
address pointed at the app's own icon, so the API docs make no request to another host and work offline.
The file is read once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import drf_spectacular_sidecar
from django.http import HttpRequest, HttpResponse
from django.templatetags.static import static
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET

REDOC_BUNDLE = Path(drf_spectacular_sidecar.__file__).parent / "static/drf_spectacular_sidecar/redoc/bundles"
CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@lru_cache(maxsize=1)
def _bundle() -> bytes:
    text = (REDOC_BUNDLE / "redoc.standalone.js").read_text(encoding="utf-8")
    return text.replace(CDN_LOGO, static("monitoring/favicon.svg")).encode()


@require_GET
@cache_control(max_age=86400, public=True)
def redoc_bundle(request: HttpRequest) -> HttpResponse:
    return HttpResponse(_bundle(), content_type="application/javascript; charset=utf-8")
