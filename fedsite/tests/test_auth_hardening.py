"""Authentication hardening over HTTP: throttling of failed credentials, admin lockout, operator tokens,
/metrics access and what an agent token may read."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import F
from django.test import Client

from clients.services import enrollment_key_create

pytestmark = pytest.mark.django_db

OTHER_IP = "127.0.0.2"


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    return body["error"]


def _assert_throttled(response: Any) -> dict[str, Any]:
    assert response.status_code == 429, response.content
    assert int(response["Retry-After"]) >= 1
    error = _error(response)
    assert error["code"] == "throttled"
    assert error["details"]["retry_after"] == int(response["Retry-After"])
    return error


def _heartbeat(client: Client, token: str, **extra: Any) -> Any:
    return client.post(
        "/api/v1/agent/heartbeat",
        {},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        **extra,
    )


@pytest.fixture
def low_limits(settings: Any) -> dict[str, str]:
    settings.FEDSITE_AUTH_FAILURE_RATES = {
        "agent_token": "3/m",
        "operator_token": "3/m",
        "enrollment": "3/m",
        "metrics_token": "3/m",
    }
    return settings.FEDSITE_AUTH_FAILURE_RATES


@pytest.fixture
def staff_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("ops", password="ops-correct-password", is_staff=True)


def _operator_token(username: str, *extra: str) -> dict[str, Any]:
    out = io.StringIO()
    call_command("create_operator_token", username, "--json", *extra, stdout=out)
    return json.loads(out.getvalue())


# --- item 6: throttling of failed authentication -----------------------------------------------------
def test_wrong_agent_tokens_below_the_limit_are_401_and_a_valid_token_still_works(
    client: Client, make_agent: Any, low_limits: Any
) -> None:
    _, token = make_agent()
    for _ in range(2):
        assert _heartbeat(client, "fsa_wrong-guess").status_code == 401
    for _ in range(5):  # successes never count towards the limit
        assert _heartbeat(client, token).status_code == 200
    assert _heartbeat(client, "fsa_wrong-guess").status_code == 401  # the third failure is still answered


def test_wrong_agent_tokens_past_the_limit_get_429_with_retry_after_on_every_agent_endpoint(
    client: Client, make_agent: Any, low_limits: Any
) -> None:
    _, token = make_agent()
    for _ in range(3):
        assert _error(_heartbeat(client, "fsa_wrong-guess"))["code"] == "invalid_token"

    error = _assert_throttled(_heartbeat(client, "fsa_wrong-guess"))
    assert "agent-token" in error["message"]
    # refused before the token is looked at: a right guess from this address is refused too
    _assert_throttled(_heartbeat(client, token))
    # the async long-poll (_prepare_poll) and a DRF view of the protocol share the counter
    _assert_throttled(client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}"))
    _assert_throttled(client.get("/api/v1/agent/models/x", HTTP_AUTHORIZATION=f"Bearer {token}"))
    # another address is not affected by these failures
    assert _heartbeat(client, token, REMOTE_ADDR=OTHER_IP).status_code == 200


def test_long_poll_counts_wrong_tokens_too(client: Client, make_agent: Any, low_limits: Any) -> None:
    _, token = make_agent()
    for _ in range(3):
        response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION="Bearer fsa_wrong")
        assert response.status_code == 401
    _assert_throttled(client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}"))
    _assert_throttled(_heartbeat(client, token))


def test_thirty_token_guesses_at_the_default_limit_are_throttled(client: Client) -> None:
    codes = [_heartbeat(client, f"fsa_guess-{i}").status_code for i in range(30)]
    assert codes[:10] == [401] * 10
    assert codes[10:] == [429] * 20


def test_counters_forget_failures_once_the_window_has_passed(
    client: Client, make_agent: Any, low_limits: Any
) -> None:
    from django.core.cache import cache

    from fedsite.throttling import FailedAuthenticationThrottle

    _, token = make_agent()
    for _ in range(3):
        _heartbeat(client, "fsa_wrong")
    _assert_throttled(_heartbeat(client, token))
    # age the recorded failures by a minute (the window of "3/m"), as the clock would
    throttle = FailedAuthenticationThrottle("agent_token")
    throttle._load("127.0.0.1")
    cache.set(throttle.key, [t - 61 for t in cache.get(throttle.key)], 60)

    assert _heartbeat(client, token).status_code == 200


def test_wrong_enrolment_keys_past_the_limit_get_429_even_with_the_right_key(
    client: Client, low_limits: Any
) -> None:
    _, secret = enrollment_key_create(label="site")

    def enrol(key: str, agent_id: str, **extra: Any) -> Any:
        body = {"enrollment_key": key, "agent_id": agent_id}
        return client.post("/api/v1/agent/enroll", body, content_type="application/json", **extra)

    assert enrol(secret, "first").status_code == 201  # a success below the limit, and it is not counted
    for i in range(3):
        assert _error(enrol(f"fse_guess-{i}", f"guess-{i}"))["code"] == "bad_enrollment_key"
    # a malformed request is a 400 and no guess: it neither counts nor is refused before the limit
    error = _assert_throttled(enrol(secret, "second"))
    assert "enrolment" in error["message"]
    assert enrol(secret, "third", REMOTE_ADDR=OTHER_IP).status_code == 201


def test_thirty_enrolment_guesses_at_the_default_limit_are_throttled(client: Client) -> None:
    codes = [
        client.post(
            "/api/v1/agent/enroll",
            {"enrollment_key": f"fse_guess-{i}", "agent_id": f"a{i}"},
            content_type="application/json",
        ).status_code
        for i in range(30)
    ]
    assert codes[:10] == [403] * 10
    assert codes[10:] == [429] * 20


def test_wrong_operator_tokens_past_the_limit_get_429(
    client: Client, staff_user: Any, low_limits: Any
) -> None:
    token = _operator_token("ops")["token"]
    assert client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}").status_code == 200
    for _ in range(3):
        response = client.get("/api/v1/trainings/", HTTP_AUTHORIZATION="Token fso_wrongwrongwrong")
        assert response.status_code == 401
        _error(response)
    _assert_throttled(client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}"))
    assert (
        client.get(
            "/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}", REMOTE_ADDR=OTHER_IP
        ).status_code
        == 200
    )


def test_forwarded_for_is_ignored_without_trusted_proxies(
    client: Client, make_agent: Any, low_limits: Any
) -> None:
    _, token = make_agent()
    for i in range(3):
        _heartbeat(client, "fsa_wrong", HTTP_X_FORWARDED_FOR=f"198.51.100.{i}")
    # a client cannot pick a fresh address per guess by sending X-Forwarded-For
    _assert_throttled(_heartbeat(client, token, HTTP_X_FORWARDED_FOR="198.51.100.99"))


# --- item 6: admin login lockout (django-axes) -------------------------------------------------------
def _admin_login(client: Client, password: str) -> Any:
    return client.post("/admin/login/?next=/admin/", {"username": "ops", "password": password})


def test_admin_login_locks_out_after_the_failure_limit_even_with_the_right_password(
    client: Client, staff_user: Any, settings: Any
) -> None:
    from axes.models import AccessAttempt

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _admin_login(client, "wrong-password").status_code == 200  # the form again, with an error
    response = _admin_login(client, "wrong-password")
    assert response.status_code == 429

    locked = _admin_login(client, "ops-correct-password")
    assert locked.status_code == 429
    assert int(locked["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())
    assert b"Too many failed logins" in locked.content
    assert "_auth_user_id" not in client.session

    # the cool-off passes (the attempts are aged by it, as the clock would): the right password works
    AccessAttempt.objects.update(
        attempt_time=F("attempt_time") - settings.AXES_COOLOFF_TIME - timedelta(seconds=1)
    )
    response = _admin_login(client, "ops-correct-password")
    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(staff_user.pk)


def test_a_successful_admin_login_resets_the_failure_count(
    client: Client, staff_user: Any, settings: Any
) -> None:
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _admin_login(client, "wrong-password")
    assert _admin_login(client, "ops-correct-password").status_code == 302
    client.logout()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _admin_login(client, "wrong-password").status_code == 200
    assert _admin_login(client, "ops-correct-password").status_code == 302


def test_lockout_is_per_address(client: Client, staff_user: Any, settings: Any) -> None:
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _admin_login(client, "wrong-password")
    other = Client(REMOTE_ADDR=OTHER_IP)
    assert _admin_login(other, "ops-correct-password").status_code == 302


def test_force_login_and_test_client_login_are_not_affected_by_axes(
    staff_client: Client, staff_user: Any
) -> None:
    assert staff_client.get("/api/v1/trainings/").status_code == 200
    other = Client()
    assert other.login(username="ops", password="ops-correct-password") is True
    assert other.get("/api/v1/trainings/").status_code == 200
    assert Client().login(username="ops", password="wrong") is False


# --- item 5: operator tokens (django-rest-knox) ------------------------------------------------------
def test_operator_token_is_stored_hashed_with_a_visible_prefix(staff_user: Any) -> None:
    from knox.models import AuthToken

    printed = _operator_token("ops")
    token = printed["token"]
    assert token.startswith("fso_")
    stored = AuthToken.objects.get()
    assert stored.token_key == printed["prefix"] == token[:15]
    assert token not in {stored.digest, stored.token_key}
    assert len(stored.digest) == 128  # sha512 hex
    assert stored.expiry is not None  # FEDSITE_OPERATOR_TOKEN_TTL_DAYS by default


def test_create_operator_token_expiry_and_refusals(staff_user: Any, django_user_model: Any) -> None:
    from django.utils import timezone
    from knox.models import AuthToken

    _operator_token("ops", "--expires-in", "2")
    expiry = AuthToken.objects.get().expiry
    assert timedelta(days=2) - timedelta(minutes=1) < expiry - timezone.now() <= timedelta(days=2)
    _operator_token("ops", "--expires-in", "0")
    assert AuthToken.objects.filter(expiry__isnull=True).count() == 1

    django_user_model.objects.create_user("viewer", password="viewer-password")
    with pytest.raises(CommandError, match="staff"):
        call_command("create_operator_token", "viewer", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No user named"):
        call_command("create_operator_token", "nobody", stdout=io.StringIO())


def test_operator_token_authenticates_expires_and_is_revoked(client: Client, staff_user: Any) -> None:
    from knox.models import AuthToken

    token = _operator_token("ops")["token"]
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    assert client.get("/api/v1/trainings/", **headers).status_code == 200

    AuthToken.objects.update(expiry=F("created") - timedelta(seconds=1))
    assert client.get("/api/v1/trainings/", **headers).status_code == 401

    token = _operator_token("ops")["token"]
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    assert client.get("/api/v1/trainings/", **headers).status_code == 200
    out = io.StringIO()
    call_command("revoke_operator_token", token[:15], stdout=out)
    assert "Revoked 1" in out.getvalue()
    assert client.get("/api/v1/trainings/", **headers).status_code == 401
    with pytest.raises(CommandError, match="No operator token matched"):
        call_command("revoke_operator_token", token[:15], stdout=io.StringIO())


def test_revoke_all_tokens_of_a_user(client: Client, staff_user: Any) -> None:
    tokens = [_operator_token("ops")["token"] for _ in range(2)]
    with pytest.raises(CommandError, match="at least 8 characters"):
        call_command("revoke_operator_token", "fso_", stdout=io.StringIO())
    call_command("revoke_operator_token", "--user", "ops", stdout=io.StringIO())
    for token in tokens:
        assert client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}").status_code == 401


def test_an_ambiguous_prefix_revokes_nothing(staff_user: Any) -> None:
    from knox.models import AuthToken

    for _ in range(2):
        _operator_token("ops")
    for i, token in enumerate(AuthToken.objects.all()):
        AuthToken.objects.filter(pk=token.pk).update(token_key=f"fso_sameprefix{i}")
    with pytest.raises(CommandError, match="matches 2 tokens"):
        call_command("revoke_operator_token", "fso_samepre", stdout=io.StringIO())
    assert AuthToken.objects.count() == 2


def test_login_endpoint_gives_a_staff_session_a_token_and_logout_revokes_it(
    client: Client, staff_user: Any
) -> None:
    assert client.post("/api/v1/auth/login").status_code in (401, 403)  # no session
    client.force_login(staff_user)
    response = client.post("/api/v1/auth/login")
    assert response.status_code == 200
    token = response.json()["token"]
    assert token.startswith("fso_") and response.json()["expiry"]
    client.logout()

    headers = {"HTTP_AUTHORIZATION": f"Token {token}"}
    assert client.get("/api/v1/trainings/", **headers).status_code == 200
    assert client.post("/api/v1/auth/logout", **headers).status_code == 204
    assert client.get("/api/v1/trainings/", **headers).status_code == 401


def test_non_staff_user_token_is_refused(client: Client, django_user_model: Any) -> None:
    from knox.models import AuthToken

    user = django_user_model.objects.create_user("viewer", password="viewer-password")
    _, token = AuthToken.objects.create(user=user)
    response = client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 401
    assert "not staff" in _error(response)["message"]


def test_agent_and_operator_tokens_are_never_mistaken_for_each_other(
    client: Client, staff_user: Any, make_agent: Any
) -> None:
    _, agent_token = make_agent()
    operator_token = _operator_token("ops")["token"]

    as_operator = client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {agent_token}")
    assert as_operator.status_code == 401
    assert "agent token" in _error(as_operator)["message"]
    bearer_on_operator_api = client.get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Bearer {agent_token}")
    assert bearer_on_operator_api.status_code in (401, 403)

    as_agent = _heartbeat(client, operator_token)
    assert as_agent.status_code == 401
    assert "operator token" in _error(as_agent)["message"]
    token_on_agent_api = client.post(
        "/api/v1/agent/heartbeat",
        {},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {operator_token}",
    )
    assert token_on_agent_api.status_code == 401


def test_drf_authtoken_is_gone_and_the_schema_documents_both_schemes(staff_client: Client) -> None:
    from django.apps import apps
    from django.conf import settings

    assert not apps.is_installed("rest_framework.authtoken")
    assert "rest_framework.authentication.TokenAuthentication" not in str(settings.REST_FRAMEWORK)
    schema = staff_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["operatorToken"]["type"] == "apiKey"
    assert schemes["operatorToken"]["name"] == "Authorization"
    assert schemes["agentToken"]["scheme"] == "bearer"
    assert {"operatorToken": []} in schema["paths"]["/api/v1/trainings/"]["get"]["security"]
    assert "/api/v1/auth/login" in schema["paths"]


# --- item 4: /metrics and what an agent may read -----------------------------------------------------
def test_metrics_needs_a_token_or_a_staff_login(settings: Any, staff_client: Client) -> None:
    client = Client()  # (staff_client is pytest-django's client, logged in)
    settings.FEDSITE_METRICS_TOKEN = "metrics-secret-1234"
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    _error(anonymous)
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer not-it").status_code == 401
    scraped = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-secret-1234")
    assert scraped.status_code == 200
    assert b"fedsite_collector_up" in scraped.content
    assert staff_client.get("/metrics").status_code == 200

    settings.FEDSITE_METRICS_ALLOW_ANONYMOUS = True
    assert Client().get("/metrics").status_code == 200


def test_metrics_without_a_configured_token_accepts_no_bearer(client: Client, settings: Any) -> None:
    settings.FEDSITE_METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything").status_code == 401


def test_wrong_metrics_tokens_are_throttled(client: Client, settings: Any, low_limits: Any) -> None:
    settings.FEDSITE_METRICS_TOKEN = "metrics-secret-1234"
    for _ in range(3):
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer guess").status_code == 401
    _assert_throttled(client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-secret-1234"))


def test_agent_reads_the_status_only_of_trainings_it_takes_part_in(
    make_agent: Any, make_training: Any, staff_client: Client
) -> None:
    from trainings.models import Task

    client = Client()  # (staff_client is pytest-django's client, logged in)
    members = [make_agent() for _ in range(3)]
    training = make_training(min_clients_per_round=3, max_clients_per_round=3)
    _, outsider_token = make_agent(online=False)
    assert Task.objects.filter(round__training=training).count() == 3
    url = f"/api/training/{training.pk}/status"

    member_view = client.get(url, HTTP_AUTHORIZATION=f"Bearer {members[0][1]}")
    assert member_view.status_code == 200
    assert member_view.json()["training_id"] == str(training.pk)

    outsider_view = client.get(url, HTTP_AUTHORIZATION=f"Bearer {outsider_token}")
    assert outsider_view.status_code == 404
    unknown = client.get(
        "/api/training/00000000-0000-0000-0000-000000000000/status",
        HTTP_AUTHORIZATION=f"Bearer {outsider_token}",
    )
    assert _error(outsider_view) == _error(unknown) | {"message": _error(outsider_view)["message"]}
    assert _error(outsider_view)["code"] == "training_not_found"

    assert staff_client.get(url).status_code == 200


def test_agent_token_reaches_no_operator_endpoint(
    client: Client, make_agent: Any, make_training: Any
) -> None:
    training = make_training(start=False)
    _, token = make_agent()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    for path in (
        "/api/v1/trainings/",
        f"/api/v1/trainings/{training.pk}/",
        f"/api/v1/trainings/{training.pk}/status/",
        f"/api/v1/trainings/{training.pk}/metrics/",
        "/api/v1/rounds/",
        "/api/v1/agents/",
        "/api/v1/versions/",
        f"/api/training/{training.pk}/metrics",
        f"/api/trainings/{training.pk}/privacy",
        "/api/system/health",
        "/api/alerts",
        "/metrics",
    ):
        response = client.get(path, **headers)
        assert response.status_code in (401, 403), (path, response.status_code)


def test_admin_lists_operator_tokens_without_showing_them_and_deletes_them(
    admin_client: Client, staff_user: Any
) -> None:
    from knox.models import AuthToken

    token = _operator_token("ops")["token"]
    page = admin_client.get("/admin/knox/authtoken/")
    assert page.status_code == 200
    assert b"ops" in page.content
    assert token.encode() not in page.content

    digest = AuthToken.objects.get().digest
    response = admin_client.post(f"/admin/knox/authtoken/{digest}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert Client().get("/api/v1/trainings/", HTTP_AUTHORIZATION=f"Token {token}").status_code == 401


def test_with_the_cache_away_authentication_fails_open(
    client: Client, make_agent: Any, settings: Any, low_limits: Any
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    _, token = make_agent()
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
        }
    }
    for _ in range(5):  # the failures are answered (not counted: there is nowhere to count them)
        assert _error(_heartbeat(client, "fsa_wrong"))["code"] == "invalid_token"
    assert _heartbeat(client, token).status_code == 200


@pytest.mark.parametrize("rate", ["0/m", "ten/m", "10/week", "10"])
def test_a_bad_throttle_rate_stops_start_up_naming_the_variable(rate: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FEDSITE_THROTTLE_ENROLLMENT": rate, "DJANGO_SETTINGS_MODULE": "fedsite.settings"}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "FEDSITE_THROTTLE_ENROLLMENT must be a rate" in result.stderr
    assert repr(rate) in result.stderr
