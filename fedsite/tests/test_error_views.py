"""Every error under /api/ has the one JSON shape, even when Django answers before any view runs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def _assert_error_shape(response, status, code):
    assert response.status_code == status
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.mark.parametrize("path", ["/api/no-such-thing", "/api/v1/agent/no-such-thing", "/api/v1/nothing/"])
def test_unrouted_api_urls_answer_json(client, path):
    _assert_error_shape(client.get(path), 404, "not_found")


def test_unrouted_pages_outside_the_api_stay_html(client):
    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_host_outside_allowed_hosts_gets_json_under_the_api(client):
    response = client.get("/api/health", HTTP_HOST="evil.example")

    _assert_error_shape(response, 400, "bad_request")
    assert "DJANGO_ALLOWED_HOSTS" in response.json()["error"]["message"]


@pytest.mark.urls("fedsite.tests.urls_raising")
def test_an_unhandled_exception_under_the_api_answers_json_500(client):
    client.raise_request_exception = False

    response = client.get("/api/v1/broken")

    _assert_error_shape(response, 500, "server_error")
    assert "a bug" not in response.content.decode()  # no internals leak


@pytest.mark.urls("fedsite.tests.urls_raising")
def test_an_unhandled_exception_on_a_page_answers_html_500(client):
    client.raise_request_exception = False

    response = client.get("/dashboard/broken")

    assert response.status_code == 500
    assert response["Content-Type"].startswith("text/html")
