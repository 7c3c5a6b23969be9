"""Simulated stragglers: the draw, partial work reported and uploaded, and the drop mode's ``/fail``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedagent.stragglers import StragglerPolicy, straggler_rng
from fedagent.tests.clients import make_client
from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer
from fedagent.trainer import FitConfig, ZooTrainer
from flcore.parameters import Parameters, subtract

Digits = tuple[np.ndarray, np.ndarray]

CONFIG = {
    "local_epochs": 5,
    "batch_size": 16,
    "learning_rate": 0.1,
    "seed": 11,
    "proximal_mu": 0.0,
    "max_steps": None,
}


def test_policy_validates() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            StragglerPolicy(bad)


def test_never_and_always() -> None:
    config = FitConfig.from_json(CONFIG)
    for seed in range(50):
        never = StragglerPolicy(0.0).decide(config, num_examples=300, rng=np.random.default_rng(seed))
        assert not never.straggles and never.config == config
        always = StragglerPolicy(1.0).decide(config, num_examples=300, rng=np.random.default_rng(seed))
        assert always.straggles and 1 <= always.config.local_epochs <= 5
        assert always.config.max_steps is None


def test_epochs_are_uniform_on_1_to_E() -> None:
    config = FitConfig.from_json(CONFIG)
    policy = StragglerPolicy(1.0)
    draws = [
        policy.decide(config, num_examples=300, rng=np.random.default_rng(s)).config.local_epochs
        for s in range(2000)
    ]
    counts = np.bincount(draws, minlength=6)[1:]
    assert counts.sum() == 2000 and (counts > 0).all()
    # Each of 5 values has expected count 400 and std sqrt(2000 * 0.2 * 0.8) = 17.9; allow 4 std.
    assert np.abs(counts - 400).max() < 72


def test_probability_is_respected() -> None:
    config = FitConfig.from_json(CONFIG)
    policy = StragglerPolicy(0.3)
    hits = sum(
        policy.decide(config, num_examples=300, rng=np.random.default_rng(s)).straggles for s in range(4000)
    )
    # Binomial(4000, 0.3): mean 1200, std 29; allow 4 std.
    assert abs(hits - 1200) < 116


def test_one_epoch_tasks_straggle_through_max_steps() -> None:
    config = FitConfig.from_json({**CONFIG, "local_epochs": 1})
    full = math.ceil(300 / 16)
    steps = {
        StragglerPolicy(1.0).decide(config, num_examples=300, rng=np.random.default_rng(s)).config.max_steps
        for s in range(500)
    }
    assert steps == set(range(1, full + 1))


def test_the_draw_is_seeded_per_task_and_agent() -> None:
    a = straggler_rng(7, "agent_001").random()
    assert a == straggler_rng(7, "agent_001").random()
    assert a != straggler_rng(8, "agent_001").random()
    assert a != straggler_rng(7, "agent_002").random()


def straggling_seed(probability: float, agent_id: str = "agent_001") -> int:
    """A task seed on which this agent straggles and draws fewer than 5 epochs."""
    config = FitConfig.from_json(CONFIG)
    for seed in range(1000):
        decision = StragglerPolicy(probability).decide(
            config, num_examples=240, rng=straggler_rng(seed, agent_id)
        )
        if decision.straggles and decision.config.local_epochs < 5:
            return seed
    raise AssertionError("no straggling seed found")


def test_straggler_reports_and_uploads_partial_work(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    seed = straggling_seed(0.5)
    config = FitConfig.from_json({**CONFIG, "seed": seed})
    decision = StragglerPolicy(0.5).decide(config, num_examples=300, rng=straggler_rng(seed, "agent_001"))
    epochs = decision.config.local_epochs
    assert decision.straggles and epochs < 5
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model, config={**CONFIG, "seed": seed})

    with make_client(fake_server, digits, straggler=StragglerPolicy(0.5)) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    upload = fake_server.uploads[task["task_id"]]
    metrics = upload.meta["metrics"]
    assert metrics["epochs_completed"] == pytest.approx(epochs)
    assert metrics["local_steps"] == epochs * math.ceil(300 / 16)
    assert metrics["straggler"] == 1
    # The upload is exactly the partial work: `epochs` epochs from the global model with the task's rng.
    from fedagent import task_rng

    x, y = digits
    trainer = ZooTrainer(DIGITS_SPEC)
    trainer.set_parameters(global_params)
    trainer.fit(x[:300], y[:300], decision.config, task_rng(seed, "agent_001"))
    want = subtract(trainer.get_parameters(), global_params)
    for name, value in want.items():
        np.testing.assert_allclose(upload.parameters[name], value, rtol=0, atol=1e-6)


def test_non_straggler_does_the_full_work(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model, config=CONFIG)

    with make_client(fake_server, digits, straggler=StragglerPolicy(0.0)) as client:
        client.run_one()

    metrics = fake_server.uploads[task["task_id"]].meta["metrics"]
    assert metrics["epochs_completed"] == pytest.approx(5.0)
    assert metrics["straggler"] == 0


def test_drop_mode_gives_the_task_back(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model, config=CONFIG)

    with make_client(fake_server, digits, straggler=StragglerPolicy(1.0, drop=True)) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "failed"
    assert task["task_id"] not in fake_server.uploads
    ((failed_id, reason),) = fake_server.failures
    assert failed_id == task["task_id"] and "Straggler" in reason
    assert not fake_server.requests_to("GET", "/api/v1/agent/models/")  # dropped before downloading


def test_cli_flags_reach_the_policy() -> None:
    from fedagent.cli import build_parser

    args = build_parser().parse_args(
        ["run", "--server", "http://x", "--agent-id", "a", "--dataset", "digits", "--num-clients", "2",
         "--client-index", "0", "--seed", "0", "--straggle-probability", "0.5", "--drop-stragglers"]
    )  # fmt: skip
    assert args.straggle_probability == 0.5 and args.drop_stragglers
