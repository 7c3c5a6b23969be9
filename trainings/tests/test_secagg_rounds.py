"""Secure-aggregation rounds over the REST API (Django's test client, eager Celery): configuration, the
identity key, a whole round with a dropout, failing safe below the threshold, and every endpoint's
validation and authority checks."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from fedagent.secagg import SecAggParty, masked_input_vector
from fedsite.errors import ValidationFailed
from flcore.parameters import ParameterSpec
from flcore.secagg import ProtocolViolation, UnmaskRequest
from flcore.secagg.simulation import identity_keys
from monitoring.models import Alert, AuditLog
from trainings import services
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, SecAggMessage, SecAggSession, Task, Training
from trainings.services.secagg import ADVERTISING, MASKING, SHARING, UNMASKING
from trainings.tests.secagg_agents import (
    answer,
    bearer,
    make_parties,
    poll,
    register,
    scan_for,
    sdk_over_wsgi,
)
from versioning.services import version_read_parameters

SECAGG = {"protocol": "secagg", "clip_norm": 1.0, "phase_timeout_seconds": 30}


def _config(**overrides: Any) -> dict[str, Any]:
    return {"name": "masked", "model_type": "logreg", "input_dim": 4, "num_classes": 3, **overrides}


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"secure_aggregation": {"protocol": "secagg++", "clip_norm": 1}}, "secure_aggregation", "protocol"),
        ({"secure_aggregation": {"protocol": "secagg"}}, "secure_aggregation", "clip_norm"),
        ({"secure_aggregation": {"clip_norm": 1, "bits": 99}}, "secure_aggregation", "bits"),
        ({"secure_aggregation": {"clip_norm": 1, "weight_cap": 0}}, "secure_aggregation", "weight_cap"),
        ({"secure_aggregation": {"clip_norm": 1, "colour": "red"}}, "secure_aggregation", "colour"),
        ({"secure_aggregation": [1]}, "secure_aggregation", "JSON object"),
        ({"secure_aggregation": {"clip_norm": 1}, "algorithm": "krum"}, "algorithm", "krum"),
        ({"secure_aggregation": {"clip_norm": 1}, "algorithm": "median"}, "algorithm", "median"),
        ({"secure_aggregation": {"clip_norm": 1}, "algorithm": "trimmed_mean"}, "algorithm", "trimmed"),
        ({"secure_aggregation": {"clip_norm": 1}, "algorithm": "norm_bounded"}, "algorithm", "clip"),
        ({"secure_aggregation": {"clip_norm": 1}, "algorithm": "fedbuff"}, "algorithm", "asynchronous"),
        ({"secure_aggregation": {"clip_norm": 1}, "privacy": {"epsilon": 3.0}}, "privacy", "central DP"),
    ],
)
def test_secure_aggregation_configuration_errors_name_the_field(
    staff_client: Any, overrides: dict[str, Any], field: str, words: str
) -> None:
    response = staff_client.post("/api/training/start", _config(**overrides), content_type="application/json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert field in error["details"], error
    assert words in error["details"][field], error
    assert Training.objects.count() == 0


def test_secure_aggregation_configuration_round_trips() -> None:
    config = TrainingConfiguration.from_dict(_config(algorithm="fedprox", secure_aggregation=SECAGG))
    again = TrainingConfiguration.from_dict(config.to_dict())
    assert again.secure_aggregation == config.secure_aggregation
    secagg = again.secagg()
    assert secagg is not None and secagg.clip_norm == 1.0 and secagg.weight_cap == 1000
    assert secagg.quantiser_config().clip_norm == pytest.approx(np.sqrt(2.0))
    with pytest.raises(ValidationFailed):
        TrainingConfiguration.from_dict(_config(secure_aggregation={"clip_norm": -1}))


# ---------------------------------------------------------------------------------------------------
# identity key
# ---------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_identity_key_is_registered_once_with_a_proof_and_audited(client: Any, make_agent: Any) -> None:
    agent, token = make_agent("keyed")
    private, _ = identity_keys([1, 2])
    party = SecAggParty(identity_key=private[1])
    first = register(client, agent, token, party)
    assert first.status_code == 201, first.content
    assert register(client, agent, token, party).status_code == 200  # the same key again: a no-op
    other = register(client, agent, token, SecAggParty(identity_key=private[2]))
    assert other.status_code == 409 and other.json()["error"]["code"] == "identity_key_set"
    agent.refresh_from_db()
    assert base64.b64decode(agent.identity_public_key) == private[1].public_key().public_bytes_raw()
    actions = list(AuditLog.objects.filter(actor="keyed").values_list("action", flat=True))
    assert "agent.identity_key_register" in actions and "agent.identity_key_refused" in actions

    _, token2 = make_agent("prover")
    public = base64.b64encode(private[2].public_key().public_bytes_raw()).decode()
    forged = base64.b64encode(private[2].sign(b"something else")).decode()
    for body in (
        {"public_key": public, "proof": forged},
        {"public_key": "not base64!", "proof": forged},
        {"public_key": base64.b64encode(b"short").decode(), "proof": forged},
        {"public_key": public},
    ):
        response = client.post(
            "/api/v1/agent/identity-key", body, content_type="application/json", **bearer(token2)
        )
        assert response.status_code == 400, (body, response.content)
    assert client.post("/api/v1/agent/identity-key", {}, content_type="application/json").status_code == 401


# ---------------------------------------------------------------------------------------------------
# a whole round
# ---------------------------------------------------------------------------------------------------


def _phase(client: Any, training: Training, agents: dict[str, dict[str, Any]], kind: str, skip=()) -> None:
    for agent_id, info in agents.items():
        if agent_id in skip:
            continue
        task = poll(client, info["token"])
        assert task is not None and task["kind"] == kind, (agent_id, task)
        response = answer(client, training, info, task)
        assert response.status_code == 201, response.content


def _expire_phase(round_: Round) -> None:
    past = timezone.now() - timedelta(seconds=1)
    Round.objects.filter(pk=round_.pk).update(deadline=past)
    SecAggSession.objects.filter(round=round_).update(deadline=past)
    Task.objects.filter(round=round_, status__in=list(Task.OPEN)).update(deadline=past)
    services.rounds_check_deadlines()


@pytest.mark.django_db
def test_a_round_with_a_dropout_gives_the_weighted_mean_of_the_survivors_and_stores_no_update(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    agents = make_parties(client, make_agent, 4, "masked")
    training = make_training(
        min_clients_per_round=3, max_clients_per_round=4, max_rounds=1, secure_aggregation=SECAGG
    )
    round_ = Round.objects.get(training=training, number=1)
    assert round_.status == ADVERTISING
    dropped = "masked-3"
    with django_capture_on_commit_callbacks(execute=True):
        _phase(client, training, agents, "secagg_advertise")
        assert Round.objects.get(pk=round_.pk).status == SHARING
        _phase(client, training, agents, "secagg_share")
        assert Round.objects.get(pk=round_.pk).status == MASKING
        _phase(client, training, agents, "secagg_masked_input", skip={dropped})
        assert Round.objects.get(pk=round_.pk).status == MASKING  # waits for the last one
        _expire_phase(round_)
        assert Round.objects.get(pk=round_.pk).status == UNMASKING
        survivors = {k: v for k, v in agents.items() if k != dropped}
        _phase(client, training, survivors, "secagg_unmask")
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED, round_.error
    session = SecAggSession.objects.get(round=round_)
    assert session.phase == SecAggSession.Phase.COMPLETED

    spec = ParameterSpec.from_json(training.parameter_spec)
    sums, weights = np.zeros(spec.num_parameters), 0.0
    for info in survivors.values():
        _, clipped, weight = masked_input_vector(
            info["delta"], spec, clip_norm=1.0, weight_cap=1000, num_examples=50
        )
        sums += weight * clipped
        weights += weight
    expected = sums / weights
    version = training.versions.get(number=1)
    base = version_read_parameters(version.parent)
    new = version_read_parameters(version)
    got = np.concatenate([(new[t.name] - base[t.name]).astype(np.float64).ravel() for t in spec.tensors])
    bound = round_.metrics["secagg_error_bound"]
    assert 0 < bound < 1e-6
    # |S'/T' - S/T| with |S' - S|, |T' - T| <= bound (T carries C = 1), plus float32 storage
    tolerance = bound * (1 + np.abs(expected).max()) / (weights - bound) + 1e-6
    assert np.abs(got - expected).max() <= tolerance
    assert round_.metrics["secagg_survivors"] == 3 and round_.metrics["num_agents_reporting"] == 3
    assert round_.metrics["secagg_dropped_after_sharing"] == 1
    assert round_.metrics["federated_accuracy"] == pytest.approx(0.5)

    hits = scan_for({k: v["delta"][t.name] for k, v in survivors.items() for t in spec.tensors[:1]})
    assert hits == []
    # the scan does find an update that is stored: the check can fail
    SecAggMessage.objects.filter(session=session).update(
        body={"leak": list(map(float, survivors["masked-0"]["delta"][spec.tensors[0].name].ravel()))}
    )
    assert scan_for({"masked-0": survivors["masked-0"]["delta"][spec.tensors[0].name]})


@pytest.mark.django_db
def test_below_the_threshold_the_round_fails_safe_and_reopens(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    agents = make_parties(client, make_agent, 3, "few")
    training = make_training(
        min_clients_per_round=2, max_clients_per_round=3, max_rounds=1, secure_aggregation=SECAGG
    )
    round_ = Round.objects.get(training=training, number=1)
    with django_capture_on_commit_callbacks(execute=True):
        _phase(client, training, agents, "secagg_advertise")
        _phase(client, training, agents, "secagg_share")
        _phase(client, training, agents, "secagg_masked_input")
        # t = 2 of 3; only one survivor answers the unmask request
        _phase(client, training, {"few-0": agents["few-0"]}, "secagg_unmask")
        _expire_phase(round_)
    round_.refresh_from_db()
    session = SecAggSession.objects.get(round=round_, attempt=1)
    assert session.phase == SecAggSession.Phase.FAILED and "threshold" in session.error
    assert not training.versions.filter(number=1).exists()  # nothing was unmasked
    assert Alert.objects.filter(training=training, kind=Alert.Kind.ROUND_FAILED).exists()
    # the two that let their unmask tasks expire are not selected again: one agent is too few, it waits
    assert round_.status == Round.Status.WAITING
    for agent_id in ("few-1", "few-2"):
        poll(client, agents[agent_id]["token"])  # they come back
    services.rounds_try_open_waiting()
    round_.refresh_from_db()
    assert round_.status == ADVERTISING and round_.attempt == 2
    assert SecAggSession.objects.get(round=round_, attempt=2).phase == SecAggSession.Phase.ADVERTISE


# ---------------------------------------------------------------------------------------------------
# validation and authority of the endpoint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_secagg_endpoint_refuses_bad_answers_with_4xx(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    agents = make_parties(client, make_agent, 3, "val")
    training = make_training(
        min_clients_per_round=3, max_clients_per_round=3, max_rounds=1, secure_aggregation=SECAGG
    )
    a, b = agents["val-0"], agents["val-1"]
    task_a = poll(client, a["token"])
    assert task_a is not None
    url = task_a["upload_url"]
    assert url.endswith("/secagg") and task_a["max_update_bytes"] > 0

    def post(body: Any, token: str, content_type: str = "application/json", **extra: Any) -> Any:
        data = json.dumps(body) if isinstance(body, dict) else body
        return client.post(url, data, content_type=content_type, **bearer(token), **extra)

    advertisement = json.loads(a["party"].advertise(task_a["config"]["secagg"]))
    assert post(advertisement, b["token"]).status_code == 403  # not b's task
    assert client.post(url, advertisement, content_type="application/json").status_code == 401
    assert post(advertisement, a["token"], "text/plain").status_code == 400
    assert post(b"{not json", a["token"]).json()["error"]["code"] == "bad_secagg_message"
    assert post({"party_id": 1}, a["token"]).status_code == 400
    assert post({**advertisement, "signature": "AAAA"}, a["token"]).status_code == 400
    other = {**advertisement, "party_id": 3 if advertisement["party_id"] != 3 else 2}
    assert post(other, a["token"]).json()["error"]["code"] == "not_your_party"
    forged = {**advertisement, "masking_key": advertisement["encryption_key"]}
    assert post(forged, a["token"]).status_code == 400  # the signature no longer covers the keys
    too_big = post(advertisement, a["token"], HTTP_CONTENT_LENGTH=str(10**9))
    assert too_big.status_code == 413
    assert post(b"x" * (task_a["max_update_bytes"] + 1), a["token"]).status_code == 413
    assert SecAggMessage.objects.count() == 0  # nothing refused was stored

    with django_capture_on_commit_callbacks(execute=True):
        assert post(advertisement, a["token"]).status_code == 201
        assert post(advertisement, a["token"]).status_code == 200  # the same bytes again: a no-op
        twin = SecAggParty(identity_key=a["party"].identity_key)  # fresh round keys, same identity
        changed = json.loads(twin.advertise(task_a["config"]["secagg"]))
        assert post(changed, a["token"]).json()["error"]["code"] == "secagg_answer_conflict"
        for agent_id in ("val-1", "val-2"):
            task = poll(client, agents[agent_id]["token"])
            assert answer(client, training, agents[agent_id], task).status_code == 201
    # the phase moved on: the advertise task is closed
    task_a_share = poll(client, a["token"])
    assert task_a_share["kind"] == "secagg_share"
    fit_url = f"/api/v1/agent/tasks/{task_a_share['task_id']}/update"
    refused_fit = client.post(fit_url, b"x", content_type="application/octet-stream", **bearer(a["token"]))
    assert 400 <= refused_fit.status_code < 500
    missing = url.replace(task_a["task_id"], "not-a-task")
    assert (
        client.post(missing, b"{}", content_type="application/json", **bearer(a["token"])).status_code == 404
    )
    share = json.loads(a["party"].share(task_a_share["config"]["secagg"]))
    share["ciphertexts"] = {}
    assert (
        client.post(task_a_share["upload_url"], share, content_type="application/json", **bearer(a["token"]))
    ).status_code == 400  # a bundle for every neighbour, or nothing


def test_an_agent_refuses_an_unmask_request_for_both_shares_of_a_neighbour() -> None:
    """Phase 4 with a server that names neighbour 2 both survivor and dropped: the party refuses and
    forgets the round (it answers nothing more for it)."""
    from flcore.secagg import RoundSetup, SecAggServer, SecureAggregationConfig

    setup = RoundSetup(
        session_id="t/round-1",
        party_ids=(1, 2, 3),
        round_seed=bytes(32),
        vector_length=5,
        config=SecureAggregationConfig(protocol="secagg", clip_norm=2.0),
    )
    private, registry = identity_keys(setup.party_ids)
    parties = {p: SecAggParty(identity_key=private[p]) for p in setup.party_ids}
    base = {"session_id": setup.session_id}
    server = SecAggServer(setup, identity_public_keys=registry)
    keys = {str(p): base64.b64encode(registry[p]).decode() for p in registry}
    from flcore.secagg import AdvertiseKeys, KeyDirectory, MaskedInput, ShareDelivery, ShareKeys

    for p, party in parties.items():
        body = {**base, "setup": setup.to_json(), "identity_keys": keys, "party_id": p}
        server.receive_advertisement(AdvertiseKeys.from_bytes(party.advertise(body)))
    for p, directory in server.close_advertising().items():
        shares = parties[p].share({**base, "directory": directory.to_json()})
        server.receive_shares(ShareKeys.from_bytes(shares))
    spec = ParameterSpec.from_json([{"name": "w", "shape": [4], "dtype": "F32"}])
    for p, delivery in server.close_sharing().items():
        body = {**base, "delivery": ShareDelivery.to_json(delivery), "clip_norm": 1.0, "weight_cap": 10}
        delta = {"w": np.full(4, 0.1 * p, dtype=np.float32)}
        blob = parties[p].masked_input(body, delta, spec, num_examples=5, rng=np.random.default_rng(p))
        server.receive_masked_input(MaskedInput.from_bytes(blob, length=5, bits=setup.config.bits))
    server.close_collecting()
    greedy = UnmaskRequest(survivors=(1, 2, 3), dropped=(2,))
    with pytest.raises(ProtocolViolation, match="both"):
        parties[1].unmask({**base, "request": greedy.to_json()})
    assert setup.session_id not in parties[1].sessions  # it answers nothing more for this round
    honest = UnmaskRequest(survivors=(1, 2, 3), dropped=())
    assert KeyDirectory  # (imported for the directory objects above)
    assert parties[2].unmask({**base, "request": honest.to_json()})


def test_a_masked_input_gets_the_upload_body_limit_not_the_json_one(settings: Any) -> None:
    from fedsite.limits import body_limit_for

    secagg = body_limit_for("/api/v1/agent/tasks/6f1c2f5e/secagg").max_bytes
    assert secagg == body_limit_for("/api/v1/agent/tasks/6f1c2f5e/update").max_bytes
    assert secagg > settings.FEDSITE_MAX_JSON_BODY_BYTES
    assert body_limit_for("/api/v1/agent/identity-key").max_bytes == settings.FEDSITE_MAX_JSON_BODY_BYTES


@pytest.mark.django_db
def test_distributed_skellam_dp_rides_on_secure_aggregation_and_the_guard_refuses_an_overspending_round(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    from privacy.accounting import composed_epsilon
    from privacy.models import PrivacyBudget
    from privacy.services import skellam_event

    agents = make_parties(client, make_agent, 3, "ddp")
    training = make_training(
        min_clients_per_round=3,
        max_clients_per_round=3,
        max_rounds=3,
        secure_aggregation=SECAGG,
        privacy={"mechanism": "distributed_skellam", "epsilon": 20.0, "min_agents": 2, "clip_norm": 1.0},
    )
    budget = PrivacyBudget.objects.get(training=training)
    assert budget.mode == PrivacyBudget.Mode.DISTRIBUTED
    event = skellam_event(budget)
    one, two = (composed_epsilon([event] * k, delta=budget.delta, accountant="rdp") for k in (1, 2))
    # a budget that affords exactly one round: the guard must refuse to open the second
    PrivacyBudget.objects.filter(pk=budget.pk).update(epsilon=(one + two) / 2)
    round_ = Round.objects.get(training=training, number=1)
    with django_capture_on_commit_callbacks(execute=True):
        for kind in ("secagg_advertise", "secagg_share", "secagg_masked_input", "secagg_unmask"):
            _phase(client, training, agents, kind)
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED, round_.error
    budget.refresh_from_db()
    assert budget.ledger.count() == 1 and budget.spent_epsilon == pytest.approx(one)

    # the version moved by the mean of the clipped deltas plus Skellam noise of three agents
    spec = ParameterSpec.from_json(training.parameter_spec)
    expected = np.mean(
        [
            masked_input_vector(a["delta"], spec, clip_norm=1.0, weight_cap=1, num_examples=1)[1]
            for a in agents.values()
        ],
        axis=0,
    )
    version = training.versions.get(number=1)
    base, new = version_read_parameters(version.parent), version_read_parameters(version)
    got = np.concatenate([(new[t.name] - base[t.name]).astype(np.float64).ravel() for t in spec.tensors])
    noise_sd = np.sqrt(2 * 3 * budget.skellam_agent_mu) / budget.skellam_scale / 3
    assert np.abs(got - expected).max() < 6 * noise_sd + 3 / budget.skellam_scale
    assert np.abs(got - expected).max() > 0  # noise was added

    training.refresh_from_db()
    assert training.status == Training.Status.BUDGET_EXHAUSTED, training.stop_reason
    second = Round.objects.get(training=training, number=2)
    assert second.status == Round.Status.CANCELLED and not second.tasks.exists()
    assert not SecAggSession.objects.filter(round=second).exists()


@pytest.fixture
def wsgi_transport() -> Any:
    """The Django application as an httpx transport, keeping the test's connection (as the test client)."""
    import httpx
    from django.core import signals
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield httpx.WSGITransport(app=get_wsgi_application())
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.mark.django_db(transaction=True)  # the agents' requests commit, as over real HTTP
def test_fedagent_runs_the_phases_and_gives_back_an_unmask_request_for_both_shares(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
    wsgi_transport: Any,
) -> None:
    """fedagent's FederatedClient over the real views: a server (here, a tampered task) that asks one
    agent for both shares of a neighbour gets the task back with the reason, and nothing from it."""

    agents = make_parties(client, make_agent, 3, "sdk")
    training = make_training(
        min_clients_per_round=2, max_clients_per_round=3, max_rounds=1, secure_aggregation=SECAGG
    )
    rng = np.random.default_rng(0)
    clients = {}
    for agent_id, info in agents.items():
        sdk = sdk_over_wsgi(agent_id, info, wsgi_transport)
        sdk.add_dataset("private", rng.normal(size=(30, 4)), rng.integers(0, 3, size=30))
        clients[agent_id] = sdk
    round_ = Round.objects.get(training=training, number=1)
    with django_capture_on_commit_callbacks(execute=True):
        for _ in ("advertise", "share", "masked input"):
            for sdk in clients.values():
                outcome = sdk.run_one(wait=0)
                assert outcome is not None and outcome.status == "uploaded", outcome
        assert Round.objects.get(pk=round_.pk).status == UNMASKING
        greedy = Task.objects.get(round=round_, agent=agents["sdk-0"]["agent"], kind="secagg_unmask")
        request = greedy.config["secagg"]["request"]
        victim = next(p for p in request["survivors"] if p != greedy.config["secagg"]["party_id"])
        greedy.config["secagg"]["request"] = {"survivors": request["survivors"], "dropped": [victim]}
        greedy.save(update_fields=["config"])
        outcomes = {agent_id: sdk.run_one(wait=0) for agent_id, sdk in clients.items()}
    assert outcomes["sdk-0"].status == "failed" and "both" in outcomes["sdk-0"].detail
    greedy.refresh_from_db()
    assert greedy.status == Task.Status.FAILED and "both" in greedy.failure_reason
    assert not SecAggMessage.objects.filter(agent=agents["sdk-0"]["agent"], phase="unmask").exists()
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED, round_.error  # t = 2 of 3: the two others suffice
    assert round_.metrics["secagg_responders"] == 2
    for sdk in clients.values():
        sdk.close()
