"""Local DP on the agent: clip, then noise, before upload; calibration; the task's requirement; the CLI."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedagent.cli import _local_dp_config, build_parser, main
from fedagent.client import FederatedClient, task_rng
from fedagent.errors import AgentError
from fedagent.local_dp import LocalDpConfig, LocalDpTransform, TaskRequirement, local_dp_hooks
from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer
from fedagent.trainer import FitConfig, ZooTrainer
from flcore.dp.calibration import analytic_gaussian_sigma
from flcore.dp.clipping import clip_by_l2_norm
from flcore.dp.mechanisms import add_gaussian_noise
from flcore.parameters import Parameters, l2_norm, subtract

ALPHA = 1e-6
Digits = tuple[np.ndarray, np.ndarray]
RUN = ["run", "--server", "http://127.0.0.1:9", "--agent-id", "a", "--token", "t", "--dataset", "digits",
       "--num-clients", "2", "--client-index", "0", "--seed", "0"]  # fmt: skip


def small_delta(scale: float = 1e-3) -> Parameters:
    rng = np.random.default_rng(0)
    return {"w": (rng.standard_normal((100, 50)) * scale).astype(np.float32), "b": np.zeros(50, np.float32)}


def fit_config(**extra: Any) -> FitConfig:
    return FitConfig.from_json({"local_epochs": 1, "batch_size": 8, "learning_rate": 0.1, "seed": 1, **extra})


def test_gaussian_noise_variance_matches_z_c() -> None:
    delta = small_delta()
    transform = LocalDpTransform(LocalDpConfig("gaussian", 2.0, 0.3), rng=np.random.default_rng(1))
    noised = transform(delta)
    noise = np.concatenate([(noised[k].astype(np.float64) - delta[k]).ravel() for k in delta])
    sigma = 0.3 * 2.0
    statistic = (noise.size - 1) * float(np.var(noise, ddof=1)) / sigma**2
    low, high = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], noise.size - 1)
    assert low <= statistic <= high
    assert transform.last_noise_stddev == sigma and transform.count == 1


def test_clipping_happens_before_the_noise() -> None:
    delta = small_delta(scale=10.0)  # norm ~700, far above C
    transform = LocalDpTransform(LocalDpConfig("gaussian", 1.0, 0.5), rng=np.random.default_rng(2))
    expected = add_gaussian_noise(clip_by_l2_norm(delta, 1.0)[0], 0.5, np.random.default_rng(2))
    for name, value in transform(delta).items():
        np.testing.assert_array_equal(value, expected[name])


def test_laplace_clips_the_l1_norm_and_has_scale_z_c() -> None:
    delta = small_delta(scale=1.0)
    transform = LocalDpTransform(LocalDpConfig("laplace", 3.0, 1e-9), rng=np.random.default_rng(3))
    clipped = transform(delta)
    assert sum(float(np.abs(v.astype(np.float64)).sum()) for v in clipped.values()) <= 3.0 + 1e-6
    noisy = LocalDpTransform(LocalDpConfig("laplace", 3.0, 0.5), rng=np.random.default_rng(4))(
        small_delta(0.0)
    )
    values = np.concatenate([v.ravel() for v in noisy.values()]).astype(np.float64)
    bound = stats.norm.ppf(1 - ALPHA / 2) * 1.5 / math.sqrt(values.size)
    assert abs(float(np.abs(values).mean()) - 1.5) <= bound  # mean |Lap(b)| = b = z C


def test_calibration_uses_the_local_sensitivity_2c() -> None:
    gaussian = LocalDpConfig.calibrated("gaussian", 0.5, epsilon=2.0, delta=1e-5)
    assert gaussian.noise_multiplier * 0.5 == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, 1.0))
    assert LocalDpConfig.calibrated("laplace", 0.5, epsilon=4.0).noise_multiplier == pytest.approx(0.5)
    with pytest.raises(ValueError, match="delta"):
        LocalDpConfig.calibrated("gaussian", 0.5, epsilon=2.0)
    with pytest.raises(ValueError, match="delta"):
        LocalDpConfig.calibrated("laplace", 0.5, epsilon=2.0, delta=1e-5)


@pytest.mark.parametrize(
    ("mechanism", "clip", "z"), [("uniform", 1.0, 1.0), ("gaussian", 0.0, 1.0), ("gaussian", 1.0, -1.0)]
)
def test_config_rejects_bad_values(mechanism: str, clip: float, z: float) -> None:
    with pytest.raises(ValueError, match=r"[Ll]ocal DP"):
        LocalDpConfig(mechanism, clip, z)


def test_task_config_overrides_the_agent_setting_for_that_task_only() -> None:
    hooks = local_dp_hooks(LocalDpConfig("gaussian", 1.0, 0.1), rng=np.random.default_rng(5))
    requirement = hooks.update_transform.requirement
    assert requirement is not None

    requirement.record(
        fit_config(local_dp={"mechanism": "laplace", "clip_norm": 2.0, "noise_multiplier": 3.0})
    )
    hooks.update_transform(small_delta())
    assert hooks.update_transform.last_noise_stddev == pytest.approx(math.sqrt(2) * 6.0)  # the task's

    hooks.update_transform(small_delta())  # the next task says nothing: the agent's own setting again
    assert hooks.update_transform.last_noise_stddev == pytest.approx(0.1)


def test_task_requirement_applies_even_without_agent_setting() -> None:
    requirement = TaskRequirement()
    transform = LocalDpTransform(None, rng=np.random.default_rng(6), requirement=requirement)
    delta = small_delta()
    assert transform(delta) is delta  # nothing required, nothing configured
    requirement.record(
        fit_config(local_dp={"mechanism": "gaussian", "clip_norm": 1.0, "noise_multiplier": 1.0})
    )
    assert transform(delta) is not delta and transform.last_noise_stddev == 1.0


@pytest.mark.parametrize(
    "bad", [{"mechanism": "gaussian"}, {"mechanism": "x", "clip_norm": 1, "noise_multiplier": 1}, 3]
)
def test_unusable_task_requirement_refuses_to_upload(bad: Any) -> None:
    requirement = TaskRequirement()
    transform = LocalDpTransform(None, rng=np.random.default_rng(7), requirement=requirement)
    requirement.record(fit_config(local_dp=bad))
    with pytest.raises(AgentError, match="will not upload"):
        transform(small_delta())


def test_attack_and_local_dp_are_not_combined() -> None:
    def attack(delta: Parameters) -> Parameters:
        return {k: -v for k, v in delta.items()}

    with pytest.raises(ValueError, match="Refusing to combine"):
        LocalDpTransform(LocalDpConfig("gaussian", 1.0, 1.0), rng=np.random.default_rng(0), attack=attack)
    hooks = local_dp_hooks(None, rng=np.random.default_rng(0), attack=attack)
    delta = small_delta()
    np.testing.assert_array_equal(hooks.update_transform(delta)["w"], -delta["w"])  # the attack still works
    assert hooks.update_transform.requirement is not None
    hooks.update_transform.requirement.record(
        fit_config(local_dp={"mechanism": "gaussian", "clip_norm": 1.0, "noise_multiplier": 1.0})
    )
    with pytest.raises(AgentError, match="attack"):
        hooks.update_transform(delta)


def test_cli_flags() -> None:
    args = build_parser().parse_args([*RUN, "--local-dp", "gaussian", "--local-dp-clip", "0.5",
                                      "--local-dp-noise-multiplier", "1.2"])  # fmt: skip
    assert _local_dp_config(args) == LocalDpConfig("gaussian", 0.5, 1.2)
    args = build_parser().parse_args([*RUN, "--local-dp", "gaussian", "--local-dp-clip", "0.5",
                                      "--local-dp-epsilon", "2", "--local-dp-delta", "1e-5"])  # fmt: skip
    assert _local_dp_config(args) == LocalDpConfig.calibrated("gaussian", 0.5, 2.0, 1e-5)
    assert _local_dp_config(build_parser().parse_args(RUN)) is None


@pytest.mark.parametrize(
    "extra",
    [
        ["--local-dp-clip", "1"],
        ["--local-dp", "gaussian", "--local-dp-noise-multiplier", "1"],
        ["--local-dp", "gaussian", "--local-dp-clip", "1"],
        ["--local-dp", "gaussian", "--local-dp-clip", "1", "--local-dp-noise-multiplier", "1",
         "--local-dp-epsilon", "1"],
        ["--local-dp", "gaussian", "--local-dp-clip", "1", "--local-dp-noise-multiplier", "1",
         "--attack", "sign_flip"],
    ],
)  # fmt: skip
def test_cli_rejects_incomplete_or_conflicting_flags(extra: list[str]) -> None:
    assert main([*RUN, *extra]) == 2


def test_task_required_local_dp_is_uploaded_noised(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    config = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.1, "seed": 123, "proximal_mu": 0.0,
              "local_dp": {"mechanism": "gaussian", "clip_norm": 0.05, "noise_multiplier": 2.0}}  # fmt: skip
    task = fake_server.add_task(model, config=config)
    records: list[logging.LogRecord] = []
    log = logging.getLogger("test.fedagent.local_dp")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    hooks = local_dp_hooks(None, rng=np.random.default_rng(42), logger=log)
    x, y = digits

    try:
        client = FederatedClient(
            agent_id="agent_001", server=fake_server.url, token="good-token", poll_wait=0, timeout=5.0,
            update_transform=hooks.update_transform, trainer_factory=hooks.trainer_factory,
        )  # fmt: skip
        with client:
            client.add_dataset("digits", x[:300], y[:300], split="train")
            client.add_dataset("digits", x[300:], y[300:], split="eval")
            outcome = client.run_one()
    finally:
        log.removeHandler(handler)

    assert outcome is not None and outcome.status == "uploaded"
    trainer = ZooTrainer(DIGITS_SPEC)
    trainer.set_parameters(global_params)
    fit = FitConfig.from_json(config)
    trainer.fit(x[:300], y[:300], fit, task_rng(fit.seed, "agent_001"))
    honest = subtract(trainer.get_parameters(), global_params)
    assert l2_norm(honest) > 0.05  # so the clipping matters
    expected = add_gaussian_noise(clip_by_l2_norm(honest, 0.05)[0], 0.1, np.random.default_rng(42))
    uploaded = fake_server.uploads[task["task_id"]].parameters
    for name, value in expected.items():
        np.testing.assert_allclose(uploaded[name], value, rtol=0, atol=1e-5)
    assert any("noise stddev 0.1" in r.getMessage() for r in records)


def test_plain_client_gives_back_a_task_that_requires_local_dp(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    """An SDK agent built without local-DP hooks must never upload an un-noised delta for such a task."""
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    config = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.1, "seed": 1, "proximal_mu": 0.0,
              "local_dp": {"mechanism": "gaussian", "clip_norm": 0.05, "noise_multiplier": 2.0}}  # fmt: skip
    task = fake_server.add_task(model, config=config)
    x, y = digits
    client = FederatedClient(
        agent_id="agent_001", server=fake_server.url, token="good-token", poll_wait=0, timeout=5.0
    )
    with client:
        client.add_dataset("digits", x[:300], y[:300], split="train")
        outcome = client.run_one()
    assert outcome is not None and outcome.status == "failed"
    assert task["task_id"] not in fake_server.uploads
    assert [task_id for task_id, _ in fake_server.failures] == [task["task_id"]]
    assert "local differential privacy" in fake_server.failures[0][1]
