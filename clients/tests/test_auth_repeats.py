"""Which agent requests consult the shared failed-authentication counter (a cache round trip), and that
skipping it for repeats opens no hole in "failed authentication is throttled" (fedsite.throttling)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from clients.services import agent_authenticate
from fedsite.errors import AuthenticationFailed, TooManyRequests
from fedsite.throttling import FailedAuthenticationThrottle

pytestmark = pytest.mark.django_db

IP, OTHER_IP = "198.51.100.7", "198.51.100.8"


@pytest.fixture
def low_limit(settings: Any) -> None:
    settings.FEDSITE_AUTH_FAILURE_RATES = {**settings.FEDSITE_AUTH_FAILURE_RATES, "agent_token": "3/m"}


def _failures_in_another_process(ip: str, n: int = 3) -> None:
    """What another web process does when it counts failures: the shared counter only, no local trace."""
    throttle = FailedAuthenticationThrottle("agent_token")
    for _ in range(n):
        throttle.record_failure(ip)


def _auth(token: str, ip: str) -> Any:
    return agent_authenticate(authorization=f"Bearer {token}", client_ip=ip)


def test_an_address_throttled_elsewhere_is_refused_with_a_valid_token_it_had_not_used(
    make_agent: Any, low_limit: None
) -> None:
    agent, token = make_agent()
    _failures_in_another_process(IP)
    with pytest.raises(TooManyRequests):
        _auth(token, IP)
    assert _auth(token, OTHER_IP).pk == agent.pk  # the token itself is fine
    with pytest.raises(TooManyRequests):  # and once cached, from the throttled address: still refused
        _auth(token, IP)


def test_a_token_accepted_from_an_address_is_checked_again_once_the_address_fails_here(
    make_agent: Any, low_limit: None
) -> None:
    agent, token = make_agent()
    assert _auth(token, IP).pk == agent.pk
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            _auth("fsa_wrong-guess", IP)
    with pytest.raises(TooManyRequests):
        _auth("fsa_wrong-guess", IP)
    with pytest.raises(TooManyRequests):  # the repeat is no longer trusted: this process saw IP fail
        _auth(token, IP)


def test_a_repeat_from_the_same_address_within_the_ttl_skips_the_counter_and_nothing_else_does(
    make_agent: Any, low_limit: None, settings: Any
) -> None:
    settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS = 0.5
    (agent, token), (_, unused) = make_agent(), make_agent()
    assert _auth(token, IP).pk == agent.pk
    _failures_in_another_process(IP)
    _failures_in_another_process(OTHER_IP)
    # the same token from the same address, already accepted here: not looked up again (a throttled IP
    # learns nothing from it: it had this token accepted already)
    assert _auth(token, IP).pk == agent.pk
    with pytest.raises(TooManyRequests):  # any other token from that address is checked
        _auth(unused, IP)
    with pytest.raises(TooManyRequests):  # the same token from another address is checked
        _auth(token, OTHER_IP)
    with pytest.raises(TooManyRequests):  # a wrong token is always checked
        _auth("fsa_wrong-guess", IP)
    time.sleep(0.6)  # past the TTL the repeat is checked again
    with pytest.raises(TooManyRequests):
        _auth(token, IP)


def test_with_the_cache_off_every_request_is_checked(make_agent: Any, low_limit: None, settings: Any) -> None:
    settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS = 0
    agent, token = make_agent()
    assert _auth(token, IP).pk == agent.pk
    _failures_in_another_process(IP)
    with pytest.raises(TooManyRequests):
        _auth(token, IP)
