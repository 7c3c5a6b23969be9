"""The agent's share of the distributed Skellam mechanism: many agents' shares sum (mod 2^bits) to the sum
of their clipped deltas plus Skellam noise of the summed mu; malformed round parameters are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedagent.errors import AgentError
from fedagent.local_dp import distributed_dp_share
from flcore.dp.skellam import SkellamParameters, skellam_decode
from flcore.parameters import ParameterSpec, flatten

ROUND = SkellamParameters(clip_norm=0.5, scale=300.0, agent_mu=50.0, bits=24, dimension=40, rotation_seed=17)


def _delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}


def test_shares_sum_to_the_clipped_sum_plus_skellam_noise_of_the_summed_mu() -> None:
    rng = np.random.default_rng(4)
    deltas = [_delta(rng) for _ in range(20)]
    spec = ParameterSpec.from_parameters(deltas[0])
    clipped = sum(flatten(d).astype(np.float64) * min(1.0, 0.5 / np.linalg.norm(flatten(d))) for d in deltas)
    errors = []
    for trial in range(30):
        shares = [
            distributed_dp_share(d, ROUND.to_json(), np.random.default_rng([trial, i]))
            for i, d in enumerate(deltas)
        ]
        assert all(
            s.dtype == np.int64 and s.shape == (64,) and s.min() >= 0 and s.max() < 2**24 for s in shares
        )
        total = np.sum(shares, axis=0) % 2**24
        decoded = skellam_decode(total, ROUND, spec)
        errors.append(flatten(decoded).astype(np.float64) - clipped)
    error = np.concatenate(errors) * ROUND.scale  # back in integer units
    # Noise Sk(20 mu) has variance 2 * 20 * 50 = 2000; rounding adds at most 20 / 4.
    variance = float(np.var(error))
    assert 2000 * 0.9 < variance < (2000 + 5) * 1.1
    assert abs(float(np.mean(error))) < 5 * math.sqrt(2005 / error.size) + 0.5  # rounding is nearly unbiased
    assert stats.kurtosis(error) == pytest.approx(0.0, abs=0.3)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "JSON object"),
        ({**ROUND.to_json(), "agent_mu": 0}, "agent_mu"),
        ({**ROUND.to_json(), "dimension": 41}, "parameters"),
        ({key: val for key, val in ROUND.to_json().items() if key != "scale"}, "scale"),
    ],
)
def test_malformed_round_parameters_are_refused(value: object, message: str) -> None:
    with pytest.raises(AgentError, match=message):
        distributed_dp_share(_delta(np.random.default_rng(0)), value, np.random.default_rng(1))
