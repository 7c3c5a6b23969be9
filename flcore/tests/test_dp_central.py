"""Client-level central DP-FedAvg (McMahan et al. 2018): clipping, unweighted sum, noise, inner step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from flcore.dp.central import CLIP_NORM_SCALAR, CentralDp, wrap_central_dp
from flcore.dp.clipping import clip_by_l2_norm
from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import Parameters, ParameterSpec, l2_norm
from flcore.strategies import ServerState, build_strategy

ALPHA = 1e-6


def make_deltas(rng: np.random.Generator, n: int, size: int = 6, scale: float = 1.0) -> list[Parameters]:
    return [
        {
            "w": (rng.standard_normal((2, size // 2)) * scale * (i + 1)).astype(np.float32),
            "b": (rng.standard_normal(3) * scale).astype(np.float32),
        }
        for i in range(n)
    ]


def base_like(delta: Parameters) -> Parameters:
    return {k: np.full(v.shape, 0.5, np.float32) for k, v in delta.items()}


def dp(**overrides: Any) -> CentralDp:
    values: dict[str, Any] = {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_clients_per_round": 4}
    values.update(overrides)
    return CentralDp.from_hyperparameters(values)


def test_hyperparameters_defaults_and_round_trip() -> None:
    strategy = dp(inner="fedavgm", inner_hyperparameters={"server_momentum": 0.5})
    hyper = strategy.hyperparameters()

    assert hyper["adaptive_clipping"] is False
    assert (hyper["target_quantile"], hyper["clip_learning_rate"]) == (0.5, 0.2)
    assert hyper["clipped_count_stddev"] == pytest.approx(4 / 20)
    assert hyper["inner_hyperparameters"] == {"server_learning_rate": 1.0, "server_momentum": 0.5}
    assert CentralDp.from_hyperparameters(hyper) == strategy
    assert strategy.algorithm == "fedavgm"  # central DP is a wrapper, not an aggregation algorithm
    assert strategy.privacy_event_parameters() == {"mechanism": "gaussian", "noise_multiplier": 1.0}


@pytest.mark.parametrize(
    "inner", ["krum", "multikrum", "median", "trimmed_mean", "norm_bounded", "fedbuff", "fedasync"]
)
def test_refuses_inner_rules_without_bounded_sensitivity(inner: str) -> None:
    with pytest.raises(ConfigError, match="sensitivity is not bounded by the clip norm"):
        dp(inner=inner)


def test_wrap_refuses_a_robust_strategy_and_wraps_a_mean() -> None:
    with pytest.raises(ConfigError, match="krum"):
        wrap_central_dp(build_strategy("krum", {"num_byzantine": 1}), noise_multiplier=1.0, clip_norm=1.0,
                        expected_clients_per_round=10)  # fmt: skip
    wrapped = wrap_central_dp(
        build_strategy("fedadam"), noise_multiplier=0.8, clip_norm=0.1, expected_clients_per_round=10
    )
    assert wrapped.inner_strategy == build_strategy("fedadam") and wrapped.algorithm == "fedadam"
    with pytest.raises(ConfigError, match="inner rule"):
        wrap_central_dp(wrapped, noise_multiplier=1.0, clip_norm=1.0, expected_clients_per_round=10)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"expected_clients_per_round": 0}, "expected_clients_per_round"),
        ({"adaptive_clipping": "yes"}, "adaptive_clipping"),
        ({"target_quantile": 1.5}, "target_quantile"),
        ({"adaptive_clipping": True, "noise_multiplier": 1.0}, "too low"),  # sigma_b = 0.2 < z / 2
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_hyperparameters_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        dp(**overrides)


def test_missing_required_hyperparameters() -> None:
    with pytest.raises(ConfigError, match="required"):
        CentralDp.from_hyperparameters({"clip_norm": 1.0})


def test_clip_then_unweighted_sum_then_noise_over_m() -> None:
    rng = np.random.default_rng(0)
    deltas = make_deltas(rng, 3)
    strategy = dp(clip_norm=1.5, expected_clients_per_round=5, noise_multiplier=0.7)

    combined, metrics = strategy.combine(deltas, [1, 100, 10_000], rng=np.random.default_rng(1))

    # By hand: clip each delta, sum them unweighted (num_examples ignored), add N(0, (zC)^2), divide by m.
    clipped = [clip_by_l2_norm(d, 1.5)[0] for d in deltas]
    replay = np.random.default_rng(1)
    for name in ("w", "b"):
        total = sum(c[name].astype(np.float64) for c in clipped)
        noise = replay.normal(0.0, 0.7 * 1.5, size=total.shape)
        np.testing.assert_allclose(combined[name], (total + noise) / 5, rtol=1e-6, atol=1e-7)
    assert metrics["dp_noise_stddev"] == pytest.approx(0.7 * 1.5 / 5)
    assert "num_clipped" not in metrics  # exact counts are not DP releases


def test_added_noise_has_std_z_c_over_m_over_many_seeded_runs() -> None:
    rng = np.random.default_rng(2)
    deltas = make_deltas(rng, 4, size=400)
    strategy = dp(noise_multiplier=1.3, clip_norm=0.5, expected_clients_per_round=8)
    clipped_mean = sum(clip_by_l2_norm(d, 0.5)[0]["w"].astype(np.float64) for d in deltas) / 8
    samples = np.concatenate(
        [
            (
                strategy.combine(deltas, [1] * 4, rng=np.random.default_rng(seed))[0]["w"] - clipped_mean
            ).ravel()
            for seed in range(50)
        ]
    )
    sigma = 1.3 * 0.5 / 8
    statistic = (samples.size - 1) * float(np.var(samples, ddof=1)) / sigma**2
    low, high = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], samples.size - 1)
    assert low <= statistic <= high
    assert abs(samples.mean()) <= stats.norm.ppf(1 - ALPHA / 2) * sigma / math.sqrt(samples.size)


def test_tiny_noise_gives_the_clipped_mean() -> None:
    rng = np.random.default_rng(3)
    deltas = make_deltas(rng, 4)
    strategy = dp(noise_multiplier=1e-9, clip_norm=0.8, expected_clients_per_round=4)
    combined, _ = strategy.combine(deltas, [5, 6, 7, 8], rng=np.random.default_rng(0))
    clipped = [clip_by_l2_norm(d, 0.8)[0] for d in deltas]
    for name in combined:
        np.testing.assert_allclose(combined[name], np.mean([c[name] for c in clipped], axis=0), atol=1e-6)
    assert l2_norm(combined) <= 0.8 + 1e-6


def test_streaming_and_chunked_paths_agree() -> None:
    deltas = make_deltas(np.random.default_rng(4), 5, size=40)
    strategy = dp(clip_norm=0.3)
    streamed, _ = strategy.combine(deltas, [1] * 5, rng=np.random.default_rng(7))
    chunked, _ = strategy.combine(
        deltas, [1] * 5, rng=np.random.default_rng(7), streaming=False, chunk_size=7
    )
    for name in streamed:
        np.testing.assert_allclose(streamed[name], chunked[name], rtol=1e-6, atol=1e-7)


def test_never_releases_without_noise() -> None:
    deltas = make_deltas(np.random.default_rng(5), 2)
    strategy = dp()
    with pytest.raises(FlcoreError, match="Generator"):
        strategy.combine(deltas, [1, 1])
    state = strategy.init_state(ParameterSpec.from_parameters(deltas[0]))
    with pytest.raises(FlcoreError, match="Generator"):
        strategy.aggregate(base_like(deltas[0]), deltas, [1, 1], state)
    accumulator = strategy.accumulator(ParameterSpec.from_parameters(deltas[0]))
    accumulator.add(deltas[0], 1.0, scale=strategy.update_scale(l2_norm(deltas[0])))
    with pytest.raises(FlcoreError, match="un-noised"):
        accumulator.result()


def test_inner_momentum_step_is_applied_to_the_noised_mean() -> None:
    rng = np.random.default_rng(6)
    rounds = [make_deltas(rng, 3) for _ in range(2)]
    strategy = dp(
        inner="fedavgm", inner_hyperparameters={"server_momentum": 0.5, "server_learning_rate": 2.0}
    )
    base = base_like(rounds[0][0])
    state = strategy.init_state(ParameterSpec.from_parameters(base))
    params = base
    momentum = {k: np.zeros(v.shape) for k, v in base.items()}
    expected = {k: v.astype(np.float64) for k, v in base.items()}
    for seed, deltas in enumerate(rounds):
        noised, _ = strategy.combine(deltas, [1, 1, 1], rng=np.random.default_rng(seed))
        params, state, _ = strategy.aggregate(
            params, deltas, [1, 1, 1], state, rng=np.random.default_rng(seed)
        )
        for name in base:  # v = beta v + Delta; x = x + eta v (Hsu et al. 2019)
            momentum[name] = 0.5 * momentum[name] + noised[name]
            expected[name] = expected[name] + 2.0 * momentum[name]
            np.testing.assert_allclose(params[name], expected[name], rtol=1e-5, atol=1e-6)
    assert state.scalars["step"] == 2 and state.scalars[CLIP_NORM_SCALAR] == 1.0
    assert list(state.tensors) == ["momentum"]


def test_adaptive_clip_norm_is_updated_and_persisted_in_the_server_state() -> None:
    rng = np.random.default_rng(8)
    deltas = make_deltas(rng, 4)  # norms about 1.7, 2.8, 4, 5: two unclipped at C = 3
    norms = [l2_norm(d) for d in deltas]
    strategy = dp(adaptive_clipping=True, clip_norm=3.0, expected_clients_per_round=100, noise_multiplier=1.0)
    spec = ParameterSpec.from_parameters(deltas[0])
    state = strategy.init_state(spec)
    base = base_like(deltas[0])

    new_global, new_state, metrics = strategy.aggregate(
        base, deltas, [1] * 4, state, rng=np.random.default_rng(11)
    )

    # By hand, replaying the draws: the sum's noise (w then b), then one normal for the count.
    replay = np.random.default_rng(11)
    z_delta = (1.0**-2 - (2 * 5.0) ** -2) ** -0.5  # sigma_b = 100 / 20 = 5
    for name in ("w", "b"):
        replay.normal(0.0, z_delta * 3.0, size=deltas[0][name].shape)
    unclipped = sum(n <= 3.0 for n in norms)
    fraction = min(1.0, max(0.0, (unclipped - 4 / 2 + replay.normal(0.0, 5.0)) / 100 + 0.5))
    expected_clip = 3.0 * math.exp(-0.2 * (fraction - 0.5))
    assert metrics["dp_clip_norm"] == 3.0
    assert metrics["dp_noise_stddev"] == pytest.approx(z_delta * 3.0 / 100)
    assert metrics["dp_unclipped_fraction"] == pytest.approx(fraction)
    assert new_state.scalars[CLIP_NORM_SCALAR] == pytest.approx(expected_clip, rel=1e-12)
    assert new_state.scalars["dp_clip_step"] == 1

    restored = ServerState.from_bytes(new_state.to_bytes(), spec)  # persisted like any server state
    assert restored.equals(new_state)
    _, _, second = strategy.aggregate(new_global, deltas, [1] * 4, restored, rng=np.random.default_rng(12))
    assert second["dp_clip_norm"] == pytest.approx(expected_clip, rel=1e-12)  # round 2 clips with the new C
    assert strategy.privacy_event_parameters()["noise_multiplier"] == 1.0


def test_bound_strategy_clips_with_the_state_clip_norm() -> None:
    strategy = dp(adaptive_clipping=True, clip_norm=3.0, expected_clients_per_round=100)
    state = ServerState({}, {"step": 0, CLIP_NORM_SCALAR: 0.5, "dp_clip_step": 4})
    bound = strategy.for_state(state)
    assert bound.update_scale(2.0) == pytest.approx(0.25, rel=1e-6)
    assert bound.unclipped_indicator(0.4) == 1 and bound.unclipped_indicator(0.6) == 0
    assert bound == strategy  # the same configuration


def test_state_with_a_bad_clip_norm_is_refused_and_a_missing_one_is_the_initial() -> None:
    deltas = make_deltas(np.random.default_rng(9), 2)
    strategy = dp(adaptive_clipping=True, clip_norm=0.7, expected_clients_per_round=100)
    with pytest.raises(FlcoreError, match=CLIP_NORM_SCALAR):
        strategy.aggregate(
            base_like(deltas[0]), deltas, [1, 1], ServerState({}, {"step": 0, CLIP_NORM_SCALAR: -1.0}),
            rng=np.random.default_rng(0),
        )  # fmt: skip
    inner_state = ServerState({}, {"step": 0})  # the inner rule's state, from before DP was enabled
    _, state, metrics = strategy.aggregate(
        base_like(deltas[0]), deltas, [1, 1], inner_state, rng=np.random.default_rng(0)
    )
    assert metrics["dp_clip_norm"] == 0.7 and CLIP_NORM_SCALAR in state.scalars


def test_fedprox_client_config_passes_through() -> None:
    assert dp(inner="fedprox", inner_hyperparameters={"proximal_mu": 0.1}).client_config() == {
        "proximal_mu": 0.1
    }


def test_an_empty_sample_releases_noise_only_over_m_and_combine_still_needs_shapes() -> None:
    # McMahan et al. (2018), Algorithm 1: with Poisson sampling an empty sample is a round like any other;
    # the sum is zero and the noise N(0, (zC)^2) over the fixed denominator m is what is released.
    strategy = dp(noise_multiplier=0.9, clip_norm=0.4, expected_clients_per_round=3)
    base = {"w": np.full((40, 50), 0.5, np.float32), "b": np.zeros(7, np.float32)}
    state = strategy.init_state(ParameterSpec.from_parameters(base))

    new, _, metrics = strategy.aggregate(base, [], [], state, rng=np.random.default_rng(5))

    replay = np.random.default_rng(5)
    for name in ("w", "b"):
        noise = replay.normal(0.0, 0.9 * 0.4, size=base[name].shape) / 3
        np.testing.assert_allclose(new[name], base[name] + noise, rtol=1e-6, atol=1e-7)
    assert metrics["num_updates"] == 0.0
    with pytest.raises(FlcoreError, match="at least one update"):
        strategy.combine([], [], rng=np.random.default_rng(5))  # no base: no shapes to noise
