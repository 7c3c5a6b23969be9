"""Simulated attacks: each against hand-computed values, ALIE's z against the paper's formula, the client
hooks end to end against the fake server, and attacks off by default."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from fedagent import task_rng
from fedagent.attacks import (
    AttackConfig,
    AttackKind,
    BenignStatistics,
    EstimatingTrainer,
    OwnDataEstimator,
    ReferenceDataEstimator,
    StatisticsBox,
    UpdateAttack,
    alie,
    alie_z,
    attack_hooks,
    benign_statistics,
    gaussian,
    scaling,
    sign_flip,
)
from fedagent.cli import build_parser, main
from fedagent.errors import AgentError
from fedagent.tests.clients import make_client
from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer
from fedagent.trainer import FitConfig, ZooTrainer
from flcore.parameters import Parameters, subtract

Digits = tuple[np.ndarray, np.ndarray]

DELTA: Parameters = {
    "w": np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32),
    "b": np.array([3.0, -0.25], dtype=np.float32),
}


def honest_delta(global_params: Parameters, data: Digits, task: dict[str, Any]) -> Parameters:
    x, y = data
    trainer = ZooTrainer(DIGITS_SPEC)
    trainer.set_parameters(global_params)
    config = FitConfig.from_json(task["config"])
    trainer.fit(x[:300], y[:300], config, task_rng(config.seed, "agent_001"))
    return subtract(trainer.get_parameters(), global_params)


# -- the attacks as functions ---------------------------------------------------------------------------


def test_sign_flip_is_exact() -> None:
    out = sign_flip(DELTA, scale=2.0, rng=np.random.default_rng(0))

    np.testing.assert_array_equal(out["w"], np.array([[-2.0, 4.0], [-1.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([-6.0, 0.5], dtype=np.float32))
    assert all(a.dtype == np.float32 for a in out.values())
    np.testing.assert_array_equal(DELTA["b"], [3.0, -0.25])  # input untouched


def test_scaling_is_exact() -> None:
    out = scaling(DELTA, factor=10.0, rng=np.random.default_rng(0))

    np.testing.assert_array_equal(out["w"], np.array([[10.0, -20.0], [5.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([30.0, -2.5], dtype=np.float32))


def test_gaussian_has_the_delta_shape_and_the_stated_std() -> None:
    delta = {"w": np.full((200, 100), 5.0, dtype=np.float32), "b": np.zeros(100, dtype=np.float32)}

    out = gaussian(delta, sigma=0.3, rng=np.random.default_rng(1234))

    assert {k: v.shape for k, v in out.items()} == {"w": (200, 100), "b": (100,)}
    assert all(a.dtype == np.float32 for a in out.values())
    values = np.concatenate([a.ravel() for a in out.values()]).astype(np.float64)
    # 20,100 draws: the sample std's standard error is 0.3 / sqrt(2 * 20100) = 0.0015; allow 1% (2 s.e.).
    assert values.std() == pytest.approx(0.3, rel=0.01)
    # The mean's standard error is 0.3 / sqrt(20100) = 0.0021; the delta's value (5) must not leak in.
    assert abs(values.mean()) < 0.01
    # Seeded: the same generator state gives the same noise.
    again = gaussian(delta, sigma=0.3, rng=np.random.default_rng(1234))
    np.testing.assert_array_equal(again["w"], out["w"])


def test_gaussian_rejects_a_negative_sigma() -> None:
    with pytest.raises(ValueError, match="sigma"):
        gaussian(DELTA, sigma=-1.0, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    ("n", "f", "quantile"),
    [
        # s = floor(50/2 + 1) - 12 = 14, (n - s)/n = 36/50
        (50, 12, 0.72),
        # The benchmark: s = floor(20/2 + 1) - 5 = 6, (20 - 6)/20 = 0.7
        (20, 5, 0.7),
        # s = floor(50/2 + 1) - 24 = 2, 48/50
        (50, 24, 0.96),
    ],
)
def test_alie_z_follows_the_paper_formula(n: int, f: int, quantile: float) -> None:
    assert math.floor(n / 2 + 1) - f == round(n - quantile * n)
    # Hand values from scipy.stats.norm.ppf (double precision), e.g. norm.ppf(0.72) = 0.5828415072712162.
    expected = {0.72: 0.5828415072712162, 0.7: 0.5244005127080407, 0.96: 1.7506860712521692}[quantile]
    assert alie_z(n, f) == pytest.approx(expected, abs=1e-12)


def test_alie_z_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n, f in [(50, 12), (20, 5), (10, 2), (100, 20)]:
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(float(stats.norm.ppf((n - s) / n)), abs=1e-12)


@pytest.mark.parametrize(("n", "f"), [(1, 0), (10, 0), (10, 10), (4, 3)])
def test_alie_z_rejects_impossible_counts(n: int, f: int) -> None:
    with pytest.raises(ValueError):
        alie_z(n, f)


def test_alie_output_is_mean_minus_z_std() -> None:
    mean = {"w": np.array([1.0, -1.0, 0.0], dtype=np.float32)}
    std = {"w": np.array([0.5, 2.0, 0.0], dtype=np.float32)}

    out = alie(mean, std, z=alie_z(50, 12), rng=np.random.default_rng(0))

    z = 0.5828415072712162
    np.testing.assert_allclose(out["w"], [1.0 - 0.5 * z, -1.0 - 2.0 * z, 0.0], rtol=1e-6)


def test_benign_statistics_are_the_coordinate_mean_and_population_std() -> None:
    deltas = [{"w": np.array([1.0, 2.0], dtype=np.float32)}, {"w": np.array([3.0, 2.0], dtype=np.float32)}]

    stats = benign_statistics(deltas)

    np.testing.assert_array_equal(stats.mean["w"], [2.0, 2.0])
    np.testing.assert_array_equal(stats.std["w"], [1.0, 0.0])
    assert stats.num_samples == 2


def test_own_data_estimator_trains_one_delta_per_disjoint_part(
    digits: Digits, global_params: Parameters
) -> None:
    x, y = digits[0][:100], digits[1][:100]
    config = FitConfig(local_epochs=1, batch_size=16, learning_rate=0.1, seed=1)
    trainer = ZooTrainer(DIGITS_SPEC)

    stats = OwnDataEstimator(4)(trainer, global_params, x, y, config, np.random.default_rng(0))

    assert stats.num_samples == 4
    assert list(stats.mean) == list(global_params)
    assert all(stats.std[name].shape == global_params[name].shape for name in global_params)
    assert any(float(s.max()) > 0 for s in stats.std.values())  # the parts differ


def test_estimating_trainer_leaves_the_honest_fit_unchanged(
    digits: Digits, global_params: Parameters
) -> None:
    x, y = digits[0][:100], digits[1][:100]
    config = FitConfig(local_epochs=1, batch_size=16, learning_rate=0.1, seed=1)
    plain = ZooTrainer(DIGITS_SPEC)
    plain.set_parameters(global_params)
    plain.fit(x, y, config, np.random.default_rng(5))
    box = StatisticsBox()
    wrapped = EstimatingTrainer(
        ZooTrainer(DIGITS_SPEC), ReferenceDataEstimator([(x[:50], y[:50]), (x[50:], y[50:])]), box
    )
    wrapped.set_parameters(global_params)

    wrapped.fit(x, y, config, np.random.default_rng(5))

    for name, value in plain.get_parameters().items():
        np.testing.assert_array_equal(wrapped.get_parameters()[name], value)
    stats = box.take()
    assert stats is not None and stats.num_samples == 2
    assert box.take() is None  # never reused for a later task


def test_attack_config_validates() -> None:
    with pytest.raises(ValueError, match="Unknown attack"):
        AttackConfig("label_flip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_agents"):
        AttackConfig(AttackKind.ALIE)
    with pytest.raises(ValueError, match="scale"):
        AttackConfig(AttackKind.SIGN_FLIP, scale=-1.0)
    assert AttackConfig(AttackKind.SCALING).factor == 10.0
    assert AttackConfig(AttackKind.SIGN_FLIP).factor == 1.0


def test_alie_transform_without_statistics_refuses() -> None:
    attack = UpdateAttack(
        AttackConfig(AttackKind.ALIE, num_agents=20, num_attackers=5),
        rng=np.random.default_rng(0),
        box=StatisticsBox(),
    )
    with pytest.raises(AgentError, match="benign statistics"):
        attack(DELTA)


def test_attack_window_poisons_exactly_the_updates_it_names() -> None:
    """honest_first=2, poisoned_count=2: updates 1-2 honest, 3-4 sign-flipped, 5 on honest again."""
    attack = UpdateAttack(
        AttackConfig(AttackKind.SIGN_FLIP, honest_first=2, poisoned_count=2), rng=np.random.default_rng(0)
    )
    flipped = []
    for _ in range(6):
        out = attack(DELTA)
        if all(np.array_equal(out[n], DELTA[n]) for n in DELTA):
            flipped.append(False)
        else:
            assert all(np.array_equal(out[n], -DELTA[n]) for n in DELTA)
            flipped.append(True)
    assert flipped == [False, False, True, True, False, False]
    assert attack.count == 2
    assert "updates 3 to 4" in attack.config.describe()
    forever = AttackConfig(AttackKind.SCALING, honest_first=1)
    assert [forever.poisons(i) for i in range(1, 5)] == [False, True, True, True]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"honest_first": -1}, "honest_first"), ({"poisoned_count": 0}, "poisoned_count"),
     ({"honest_first": 1.5}, "honest_first"), ({"poisoned_count": True}, "poisoned_count")],
)  # fmt: skip
def test_attack_window_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AttackConfig(AttackKind.SIGN_FLIP, **kwargs)


def test_cli_refuses_an_attack_window_without_an_attack() -> None:
    code = main(
        ["run", "--server", "http://127.0.0.1:9", "--agent-id", "a", "--token", "t", "--dataset", "digits",
         "--num-clients", "2", "--client-index", "0", "--seed", "0", "--attack-after", "3"]
    )  # fmt: skip
    assert code == 2


# -- the hooks in a client, against the fake server ------------------------------------------------------


def test_attacks_are_off_by_default(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)

    with make_client(fake_server, digits) as client:
        assert client.update_transform is None and client.trainer_factory is None
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    want = honest_delta(global_params, digits, task)
    uploaded = fake_server.uploads[task["task_id"]].parameters
    for name, value in want.items():
        np.testing.assert_allclose(uploaded[name], value, rtol=0, atol=1e-6)
    assert "straggler" not in fake_server.uploads[task["task_id"]].meta["metrics"]


def test_cli_has_no_attack_unless_asked() -> None:
    args = build_parser().parse_args(
        ["run", "--server", "http://x", "--agent-id", "a", "--dataset", "digits", "--num-clients", "2",
         "--client-index", "0", "--seed", "0"]
    )  # fmt: skip
    assert args.attack is None and args.straggle_probability == 0.0 and not args.drop_stragglers


def test_cli_rejects_alie_without_n_and_f() -> None:
    code = main(
        ["run", "--server", "http://127.0.0.1:9", "--agent-id", "a", "--token", "t", "--dataset", "digits",
         "--num-clients", "2", "--client-index", "0", "--seed", "0", "--attack", "alie"]
    )  # fmt: skip
    assert code == 2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (AttackConfig(AttackKind.SIGN_FLIP), lambda d: -d),
        (AttackConfig(AttackKind.SIGN_FLIP, scale=3.0), lambda d: -3.0 * d),
        (AttackConfig(AttackKind.SCALING, scale=5.0), lambda d: 5.0 * d),
    ],
)
def test_deterministic_attacks_are_uploaded(
    fake_server: FakeAgentServer,
    digits: Digits,
    global_params: Parameters,
    config: AttackConfig,
    expected: Any,
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    records: list[logging.LogRecord] = []
    attack_logger = logging.getLogger("test.fedagent.attacks")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    attack_logger.addHandler(handler)
    hooks = attack_hooks(config, rng=np.random.default_rng(0), logger=attack_logger)

    try:
        with make_client(
            fake_server,
            digits,
            update_transform=hooks.update_transform,
            trainer_factory=hooks.trainer_factory,
        ) as client:
            assert client.run_one() is not None
    finally:
        attack_logger.removeHandler(handler)

    want = honest_delta(global_params, digits, task)
    uploaded = fake_server.uploads[task["task_id"]].parameters
    for name, value in want.items():
        np.testing.assert_allclose(uploaded[name], expected(value), rtol=0, atol=1e-5)
    assert [r.levelno for r in records if "ATTACK SIMULATION" in r.getMessage()] == [logging.WARNING]


def test_gaussian_attack_is_uploaded(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    hooks = attack_hooks(AttackConfig(AttackKind.GAUSSIAN, sigma=2.0), rng=np.random.default_rng(42))

    with make_client(fake_server, digits, update_transform=hooks.update_transform) as client:
        client.run_one()

    uploaded = fake_server.uploads[task["task_id"]].parameters
    values = np.concatenate([a.ravel() for a in uploaded.values()]).astype(np.float64)
    # 1,210 parameters: the sample std's standard error is 2 / sqrt(2 * 1210) = 0.041; allow 0.15 (3.6 s.e.).
    assert values.std() == pytest.approx(2.0, abs=0.15)
    expected = gaussian(global_params, sigma=2.0, rng=np.random.default_rng(42))
    for name, value in expected.items():
        np.testing.assert_array_equal(uploaded[name], value)


def test_alie_attack_uploads_mean_minus_z_std_of_its_own_estimate(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    config = AttackConfig(AttackKind.ALIE, num_agents=20, num_attackers=5, num_estimates=3)
    seen: list[BenignStatistics] = []

    class RecordingEstimator(OwnDataEstimator):
        def __call__(self, *args: Any, **kwargs: Any) -> BenignStatistics:
            stats = super().__call__(*args, **kwargs)
            seen.append(stats)
            return stats

    hooks = attack_hooks(config, rng=np.random.default_rng(0), estimator=RecordingEstimator(3))
    with make_client(
        fake_server, digits, update_transform=hooks.update_transform, trainer_factory=hooks.trainer_factory
    ) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    (stats,) = seen
    assert stats.num_samples == 3
    uploaded = fake_server.uploads[task["task_id"]].parameters
    z = 0.5244005127080407  # norm.ppf(0.7), n = 20, f = 5
    for name in global_params:
        want = stats.mean[name].astype(np.float64) - z * stats.std[name].astype(np.float64)
        np.testing.assert_allclose(uploaded[name], want, rtol=1e-6, atol=1e-7)
    # The honest metrics still describe the honest fit (the estimate did not disturb it).
    honest = honest_delta(global_params, digits, task)
    assert not all(np.allclose(uploaded[n], honest[n]) for n in honest)
