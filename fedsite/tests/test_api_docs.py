"""Swagger UI and ReDoc work offline: every asset they load is served by the app itself."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.django_db

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("path", ["/api/docs/", "/api/redoc/"])
def test_api_docs_load_only_local_assets(client, path):
    page = client.get(path)
    assert page.status_code == 200
    html = page.content.decode()
    assets = [url for url in ASSET.findall(html) if not url.startswith(("#", "data:"))]
    assert assets, html[:500]

    external = [url for url in assets if re.match(r"(https?:)?//", url)]
    assert external == []
    for url in assets:
        response = client.get(url)
        assert response.status_code == 200, url
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert len(body) > 100, url
    assert any("swagger-ui" in url or "redoc" in url for url in assets)
