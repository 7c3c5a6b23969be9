"""Client-level central differential privacy: DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018, "Learning
Differentially Private Recurrent Language Models", ICLR, Algorithm 1), optionally with adaptive clipping
(Andrew et al. 2021, Algorithm 1).

:class:`CentralDp` wraps an inner mean-based strategy. One round:

1. each delta is clipped to ``C``: scaled by ``min(1, C / ||Delta_i||_2)`` (:meth:`CentralDp.update_scale`);
2. the clipped deltas are SUMMED, unweighted (:meth:`CentralDp.update_weight` is 1: weighting by
   ``num_examples`` would let one client's weight, hence its influence, grow without bound);
3. Gaussian noise ``N(0, (z C)^2 I)`` is added to the sum, which is divided by the FIXED denominator
   ``m = qN``, the expected clients per round (the "fixed-denominator estimator" ``f~_f`` of McMahan et al.
   2018, Section 2, with uniform weights ``w_k = 1``): ``Delta = (sum_i clip(Delta_i) + N(0, z^2 C^2 I)) / m``
   (:meth:`CentralDp.noised_mean`);
4. the inner rule's server optimizer step (FedAvg, FedAvgM, FedAdam, ...) is applied to ``Delta``; it is
   post-processing and costs no privacy.

The sum has L2 sensitivity ``C`` when one client is added or removed, so each round is a Gaussian
mechanism with noise multiplier ``z``; with Poisson sampling of clients at rate ``q`` the server's privacy
app accounts for it (RDP/PLD, ``dp-accounting``) from :meth:`CentralDp.privacy_event_parameters`.

With ``adaptive_clipping`` the clip norm is a state: it is read from ``ServerState.scalars`` (key
:data:`CLIP_NORM_SCALAR`), each update adds ``b_i = 1[||Delta_i|| <= C]`` to a count, and after the step the
count is noised and ``C`` updated geometrically (:mod:`flcore.dp.adaptive_clipping`). The update sum is then
noised with the corrected multiplier ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the whole round
(sum and count) is a Gaussian mechanism with multiplier ``z``.

Server-side use, streaming one update at a time (what :meth:`CentralDp.aggregate` does in process)::

    dp = wrap_central_dp(inner, noise_multiplier=1.0, clip_norm=0.5, expected_clients_per_round=100)
    state = dp.init_state(spec)
    rng = np.random.default_rng(secrets.randbits(128))   # fresh OS entropy, never a stored seed
    # every round:
    round_dp = dp.for_state(state)                        # binds this round's clip norm
    accumulator = round_dp.accumulator(spec)
    num_unclipped = 0
    for update, num_examples, norm in updates:
        accumulator.add(update, round_dp.update_weight(num_examples, norm), scale=round_dp.update_scale(norm))
        num_unclipped += round_dp.unclipped_indicator(norm)
    delta = round_dp.noised_mean(accumulator.sum(), accumulator.count, rng)
    new_global, state = round_dp.apply(base, delta, state)
    state, noised_fraction = round_dp.adapt_clip_norm(state, num_unclipped, accumulator.count, rng)
    ledger.record(round_dp.privacy_event_parameters())

Invariants:

- Nothing that depends on the data leaves :meth:`CentralDp.noised_mean` or :meth:`CentralDp.adapt_clip_norm`
  un-noised: the accumulator's :meth:`ClippedSumAccumulator.result` refuses (so a generic server path can
  never release an un-noised mean by mistake), :meth:`CentralDp.combine` and :meth:`CentralDp.aggregate`
  require an ``rng``, and their metrics hold no exact clipped or unclipped counts. ``num_updates`` is in
  the metrics as for every strategy; under Poisson sampling it is itself data about who took part and
  should be shown to operators only.
- The inner rule is one of :data:`ALLOWED_INNER_ALGORITHMS`, whose combination is a weighted mean; robust
  and asynchronous rules are refused (:class:`~flcore.errors.ConfigError`).
- :attr:`CentralDp.algorithm` is the inner rule's (central DP is a training setting, not an aggregation
  algorithm); the state is the inner rule's plus the scalar :data:`CLIP_NORM_SCALAR`, which every inner
  step carries over.
- Floating point: clipped values are exact float32 multiples bounded by ``C`` (see
  :mod:`flcore.dp.clipping`); the noise is drawn and added in float64 (:mod:`flcore.dp.mechanisms`).
  Like every floating-point DP implementation, this does not defend against attacks on the low-order bits
  of the noise (Mironov 2012).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from flcore.dp._checks import count, generator
from flcore.dp.adaptive_clipping import (
    DEFAULT_CLIP_LEARNING_RATE,
    DEFAULT_TARGET_QUANTILE,
    AdaptiveClipConfig,
    AdaptiveClipState,
    adaptive_clip_step,
    default_clipped_count_stddev,
    unclipped_indicator,
    update_noise_multiplier,
)
from flcore.dp.clipping import clip_factor
from flcore.dp.mechanisms import gaussian_noise
from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import Parameters, ParameterSpec, l2_norm
from flcore.strategies.base import (
    STREAMING_CHUNK_SIZE,
    AggregationAlgorithm,
    Hyperparameter,
    ServerState,
    Strategy,
)
from flcore.strategies.fedavg import FedAvgAccumulator

__all__ = [
    "ALLOWED_INNER_ALGORITHMS",
    "CLIP_NORM_SCALAR",
    "CentralDp",
    "ClippedSumAccumulator",
    "wrap_central_dp",
]

NAME = "central_dp"
"""How hyperparameter errors name this wrapper."""

ALLOWED_INNER_ALGORITHMS: tuple[str, ...] = (
    AggregationAlgorithm.FEDAVG.value,
    AggregationAlgorithm.FEDAVGM.value,
    AggregationAlgorithm.FEDPROX.value,
    AggregationAlgorithm.FEDADAM.value,
    AggregationAlgorithm.FEDYOGI.value,
    AggregationAlgorithm.FEDADAGRAD.value,
)
"""Inner rules whose combination is a mean, replaced here by the noised clipped sum over ``m``."""

CLIP_NORM_SCALAR = "dp_clip_norm"
"""``ServerState.scalars`` key holding the clip norm of the next round."""

CLIP_STEP_SCALAR = "dp_clip_step"
"""``ServerState.scalars`` key counting the adaptive clip-norm updates."""

_HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("noise_multiplier", "float", minimum=0.0, minimum_inclusive=False),
    Hyperparameter("clip_norm", "float", minimum=0.0, minimum_inclusive=False),
    Hyperparameter("expected_clients_per_round", "float", minimum=0.0, minimum_inclusive=False),
    Hyperparameter("target_quantile", "float", DEFAULT_TARGET_QUANTILE, minimum=0.0, maximum=1.0),
    Hyperparameter("clip_learning_rate", "float", DEFAULT_CLIP_LEARNING_RATE, minimum=0.0),
    Hyperparameter(
        "clipped_count_stddev", "float", None, minimum=0.0, minimum_inclusive=False, nullable=True
    ),
    Hyperparameter("inner", "str", "fedavg"),
    Hyperparameter("inner_hyperparameters", "mapping", {}),
)
_BOOLEANS = {"adaptive_clipping": False}
_REQUIRED = ("noise_multiplier", "clip_norm", "expected_clients_per_round")


def _refuse_inner(inner: object) -> ConfigError:
    return ConfigError(
        f"central_dp cannot wrap the aggregation rule {inner!r}. Central DP adds Gaussian noise calibrated "
        "to the clip norm C, the L2 sensitivity of the SUM of clipped updates; robust rules (krum, "
        "multikrum, median, trimmed_mean) select or sort updates, norm_bounded already rescales them, and "
        "asynchronous rules (fedbuff, fedasync) weight them by staleness one at a time, so their "
        "sensitivity is not bounded by the clip norm and the privacy guarantee would not hold. "
        f"Allowed inner rules: {list(ALLOWED_INNER_ALGORITHMS)}."
    )


class ClippedSumAccumulator(FedAvgAccumulator):
    """Streaming SUM of clipped updates for :class:`CentralDp`, with one float32 model-sized buffer.

    Add each update with weight 1 and ``scale = min(1, C / norm)``; read :meth:`sum` and release it only
    through :meth:`CentralDp.noised_mean`. :meth:`result` (the un-noised mean) refuses.
    """

    def sum(self) -> Parameters:
        """Return ``sum_i scale_i * Delta_i`` as new float32 arrays in spec order.

        Raises
        ------
        FlcoreError
            If the sum is not finite (a stored update added with ``verified=True`` held NaN or Inf).
        """
        if self._unchecked:
            self._check_accumulator_finite()
            self._unchecked = False
        result: Parameters = {}
        for tensor in self.spec.tensors:
            start, stop = self._offsets[tensor.name]
            result[tensor.name] = self._accumulator[start:stop].reshape(tensor.shape).copy()
        return result

    def result(self) -> Parameters:
        """Refuse: the un-noised mean of a DP round must never be released; use :meth:`sum` + noise."""
        raise FlcoreError(
            "A central-DP round cannot release the un-noised mean: pass accumulator.sum() to "
            "CentralDp.noised_mean(sum_of_clipped, count, rng)."
        )


@dataclass(frozen=True)
class CentralDp(Strategy):
    """DP-FedAvg with client-level central DP around an inner mean-based rule (McMahan et al. 2018).

    Parameters
    ----------
    noise_multiplier : float
        ``z > 0``: the noise on the clipped sum has standard deviation ``z C`` (with adaptive clipping, ``z``
        is the multiplier of the whole round; the sum gets ``z_Delta > z``). Required.
    clip_norm : float
        ``C > 0``: the L2 bound of each client's delta (with adaptive clipping, the initial ``C``; Andrew et
        al. 2021 start from 0.1). Required.
    expected_clients_per_round : float
        ``m = qN > 0``, the fixed denominator (``q`` the sampling rate, ``N`` the population). Required.
    adaptive_clipping : bool
        Track the ``target_quantile`` of update norms (Andrew et al. 2021); default False.
    target_quantile : float
        ``gamma`` in ``[0, 1]``; default 0.5 (Andrew et al. 2021).
    clip_learning_rate : float
        ``eta_C >= 0``; default 0.2 (Andrew et al. 2021).
    clipped_count_stddev : float or None
        ``sigma_b > 0``; default (None) ``expected_clients_per_round / 20`` (Andrew et al. 2021). Adaptive
        clipping needs ``noise_multiplier < 2 * sigma_b``.
    inner : str
        One of :data:`ALLOWED_INNER_ALGORITHMS`; default ``"fedavg"``.
    inner_hyperparameters : mapping
        The inner rule's hyperparameters (its defaults if empty).
    """

    algorithm: ClassVar[AggregationAlgorithm] = AggregationAlgorithm.FEDAVG  # per instance: the inner's
    HYPERPARAMETERS: ClassVar[tuple[Hyperparameter, ...]] = _HYPERPARAMETERS
    needs_norms: ClassVar[bool] = True

    noise_multiplier: float
    clip_norm: float
    expected_clients_per_round: float
    adaptive_clipping: bool = False
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
    clipped_count_stddev: float | None = None
    inner: str = "fedavg"
    inner_hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    inner_strategy: Strategy = field(init=False, repr=False, compare=False)
    round_clip_norm: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for hyperparameter in self.HYPERPARAMETERS:
            value = hyperparameter.check(NAME, getattr(self, hyperparameter.name))
            object.__setattr__(self, hyperparameter.name, value)
        if not isinstance(self.adaptive_clipping, bool):
            raise ConfigError(
                f"{NAME} hyperparameter 'adaptive_clipping' must be true or false. "
                f"Found {self.adaptive_clipping!r}."
            )
        if self.inner not in ALLOWED_INNER_ALGORITHMS:
            raise _refuse_inner(self.inner)
        from flcore.strategies.registry import build_strategy  # the registry builds every inner rule

        try:
            inner = build_strategy(self.inner, self.inner_hyperparameters)
        except ConfigError as exc:
            raise ConfigError(f"{NAME} hyperparameter 'inner_hyperparameters' is invalid: {exc}") from None
        if self.clipped_count_stddev is None:
            object.__setattr__(
                self, "clipped_count_stddev", default_clipped_count_stddev(self.expected_clients_per_round)
            )
        if self.adaptive_clipping:
            try:
                update_noise_multiplier(self.noise_multiplier, self.count_stddev)
            except FlcoreError as exc:
                raise ConfigError(f"{NAME}: {exc}") from None
        object.__setattr__(self, "inner_strategy", inner)
        object.__setattr__(self, "inner_hyperparameters", inner.hyperparameters())
        object.__setattr__(self, "algorithm", inner.algorithm)
        object.__setattr__(self, "STATE_GROUPS", inner.STATE_GROUPS)
        object.__setattr__(self, "round_clip_norm", self.clip_norm)

    # ---- hyperparameters ----------------------------------------------------------------------------

    @classmethod
    def from_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> Self:
        """Validate the central-DP hyperparameters (see the class docstring), fill defaults and build.

        Raises
        ------
        ConfigError
            For an unknown key, a missing required field, an invalid value or a refused inner rule.
        """
        if not isinstance(hyperparameters, Mapping):
            raise ConfigError(
                f"{NAME} hyperparameters must be a JSON object. Found {type(hyperparameters).__name__}."
            )
        known = {h.name for h in _HYPERPARAMETERS} | set(_BOOLEANS)
        unknown = sorted(str(k) for k in hyperparameters if k not in known)
        if unknown:
            raise ConfigError(f"Unknown {NAME} hyperparameter(s) {unknown}; allowed: {sorted(known)}.")
        missing = [name for name in _REQUIRED if name not in hyperparameters]
        if missing:
            raise ConfigError(f"{NAME} hyperparameter(s) {missing} are required (numbers above 0).")
        return cls(**dict(hyperparameters))

    def hyperparameters(self) -> dict[str, Any]:
        """Return every hyperparameter, normalised (defaults filled in, the inner rule's too)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "expected_clients_per_round": self.expected_clients_per_round,
            "adaptive_clipping": self.adaptive_clipping,
            "target_quantile": self.target_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "clipped_count_stddev": self.clipped_count_stddev,
            "inner": self.inner,
            "inner_hyperparameters": self.inner_strategy.hyperparameters(),
        }

    def client_config(self) -> dict[str, Any]:
        """Return the inner rule's client configuration (e.g. FedProx's ``proximal_mu``)."""
        return self.inner_strategy.client_config()

    # ---- privacy parameters -------------------------------------------------------------------------

    @property
    def count_stddev(self) -> float:
        """``sigma_b``, the noise on the clipped count (default filled in)."""
        assert self.clipped_count_stddev is not None  # filled in __post_init__
        return self.clipped_count_stddev

    @property
    def sum_noise_multiplier(self) -> float:
        """The multiplier of the noise on the clipped sum: ``z``, or ``z_Delta`` with adaptive clipping."""
        if self.adaptive_clipping:
            return update_noise_multiplier(self.noise_multiplier, self.count_stddev)
        return self.noise_multiplier

    def noise_stddev(self) -> float:
        """Standard deviation of the noise on each coordinate of the released mean: ``z_sum C / m``."""
        return self.sum_noise_multiplier * self.round_clip_norm / self.expected_clients_per_round

    def privacy_event_parameters(self) -> dict[str, Any]:
        """Return what the accountant needs per round: ``{"mechanism": "gaussian", "noise_multiplier": z}``.

        ``z`` is the noise multiplier of the round's whole release w.r.t. adding or removing one client:
        ``z`` itself without adaptive clipping; with it, the combined multiplier of the update sum
        (``z_Delta``) and the centred clipped count (``2 sigma_b``), ``(z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)``,
        which equals the configured ``z`` by construction (Andrew et al. 2021, Section 3.1). The sampling
        rate ``q`` is the server's (it samples the clients).
        """
        return {"mechanism": "gaussian", "noise_multiplier": self.noise_multiplier}

    # ---- state ----------------------------------------------------------------------------------------

    def init_state(self, spec: ParameterSpec) -> ServerState:
        """Return the inner rule's initial state plus ``dp_clip_norm = C`` and ``dp_clip_step = 0``."""
        state = self.inner_strategy.init_state(spec)
        scalars = dict(state.scalars)
        scalars[CLIP_NORM_SCALAR] = self.clip_norm
        scalars[CLIP_STEP_SCALAR] = 0
        return ServerState(state.tensors, scalars)

    def check_state(self, state: ServerState, spec: ParameterSpec) -> None:
        """Check ``state`` against the inner rule, and its ``dp_clip_norm`` (if any) is positive and finite.

        A state without ``dp_clip_norm`` (e.g. the inner rule's, from before central DP was enabled) is
        accepted: its round clips with the configured ``clip_norm``.
        """
        self.inner_strategy.check_state(state, spec)
        value = state.scalars.get(CLIP_NORM_SCALAR, self.clip_norm)
        if not math.isfinite(float(value)) or float(value) <= 0:
            raise FlcoreError(
                f"A central-DP server state needs a positive finite scalar {CLIP_NORM_SCALAR!r}; "
                f"found {value!r} (build it with CentralDp.init_state)."
            )

    def clip_state(self, state: ServerState) -> AdaptiveClipState:
        """Return the adaptive clip state stored in ``state.scalars`` (the configured ``C`` if none is)."""
        return AdaptiveClipState(
            clip_norm=float(state.scalars.get(CLIP_NORM_SCALAR, self.clip_norm)),
            step=int(state.scalars.get(CLIP_STEP_SCALAR, 0)),
        )

    def for_state(self, state: ServerState) -> CentralDp:
        """Return this strategy bound to the round's clip norm (the state's if adaptive, else ``C``)."""
        if not self.adaptive_clipping:
            return self
        bound = copy.copy(self)
        object.__setattr__(bound, "round_clip_norm", self.clip_state(state).clip_norm)
        return bound

    def apply(
        self, base: Parameters, delta: Parameters, state: ServerState
    ) -> tuple[Parameters, ServerState]:
        """Take the inner rule's server step (post-processing); the DP scalars are carried over."""
        return self.inner_strategy.apply(base, delta, state)

    def adapt_clip_norm(
        self, state: ServerState, num_unclipped: int, num_updates: int, rng: np.random.Generator
    ) -> tuple[ServerState, float | None]:
        """Update the stored clip norm after a round (Andrew et al. 2021, Algorithm 1); no-op if not adaptive.

        Parameters
        ----------
        state : ServerState
            The state after the round's step.
        num_unclipped : int
            ``sum_i 1[||Delta_i|| <= C]`` with the round's ``C`` (:meth:`unclipped_indicator`).
        num_updates : int
            Updates combined in the round.
        rng : numpy.random.Generator
            Source of the count noise.

        Returns
        -------
        tuple of (ServerState, float or None)
            The new state and the released noised unclipped fraction (None without adaptive clipping).
        """
        if not self.adaptive_clipping:
            return state, None
        config = AdaptiveClipConfig(
            self.expected_clients_per_round, self.target_quantile, self.clip_learning_rate, self.count_stddev
        )
        clip, fraction = adaptive_clip_step(self.clip_state(state), num_unclipped, num_updates, config, rng)
        scalars = dict(state.scalars)
        scalars[CLIP_NORM_SCALAR] = clip.clip_norm
        scalars[CLIP_STEP_SCALAR] = clip.step
        return ServerState(state.tensors, scalars), fraction

    # ---- combination ----------------------------------------------------------------------------------

    def check_num_updates(self, num_updates: int) -> None:
        """Delegate to the inner rule (at least one update)."""
        self.inner_strategy.check_num_updates(num_updates)

    def update_weight(self, num_examples: int, norm: float) -> float:
        """Return 1: the clipped deltas are summed unweighted, so each client's influence is at most ``C``."""
        return 1.0

    def update_scale(self, norm: float) -> float:
        """Return ``min(1, C / norm)`` for the round's ``C`` (see :func:`flcore.dp.clipping.clip_factor`)."""
        return clip_factor(norm, self.round_clip_norm)

    def unclipped_indicator(self, norm: float) -> int:
        """Return ``b_i = 1[norm <= C]`` for the round's ``C`` (Andrew et al. 2021)."""
        return unclipped_indicator(norm, self.round_clip_norm)

    def accumulator(
        self, spec: ParameterSpec, *, chunk_size: int = STREAMING_CHUNK_SIZE
    ) -> ClippedSumAccumulator:
        """Return a streaming clipped-SUM accumulator (add with weight 1 and ``scale=update_scale(norm)``)."""
        return ClippedSumAccumulator(spec, chunk_size=chunk_size)

    def combine_chunk(
        self, matrix: npt.NDArray[np.float32], weights: npt.NDArray[np.float64], context: Any = None
    ) -> npt.NDArray[np.float32]:
        """Return the SUM of the chunk's (already clipped) rows, computed in float64 (weights are all 1)."""
        total = np.asarray(weights, dtype=np.float64) @ np.asarray(matrix, dtype=np.float64)
        return np.asarray(total, dtype=np.float32)

    def noised_mean(
        self, sum_of_clipped: Mapping[str, npt.NDArray[Any]], count_of_updates: int, rng: np.random.Generator
    ) -> Parameters:
        """Return ``(sum_of_clipped + N(0, (z_sum C)^2 I)) / m``, the fixed-denominator estimator.

        McMahan et al. (2018), Algorithm 1 with ``f~_f`` (Section 2): ``Delta = (sum_i clip(Delta_i) +
        N(0, sigma^2 I)) / (qW)``, ``sigma = z S``, uniform weights so ``qW = m``. The noise is drawn and
        added in float64 tensor by tensor (in the order of ``sum_of_clipped``) and the result cast once.

        Parameters
        ----------
        sum_of_clipped : mapping of str to ndarray
            ``sum_i clip(Delta_i)`` (:meth:`ClippedSumAccumulator.sum`).
        count_of_updates : int
            Updates in the sum (>= 0); the denominator stays ``m`` whatever it is (that is what bounds the
            sensitivity: dividing by the actual count would reveal it).
        rng : numpy.random.Generator
            Source of the noise; in production ``np.random.default_rng(secrets.randbits(128))``.
        """
        count("count_of_updates", count_of_updates)
        source = generator(rng)
        stddev = self.sum_noise_multiplier * self.round_clip_norm
        m = self.expected_clients_per_round
        return {
            name: (
                (np.asarray(array, dtype=np.float64) + gaussian_noise(np.shape(array), stddev, source)) / m
            ).astype(np.float32)
            for name, array in sum_of_clipped.items()
        }

    def _clipped_sum(
        self,
        deltas: Sequence[Parameters],
        num_examples: Sequence[int],
        chunk_size: int | None,
        streaming: bool | None,
        spec: ParameterSpec | None = None,
    ) -> tuple[Parameters, int]:
        """Return the clipped sum and the number of unclipped updates (after the base class's checks).

        With ``spec`` (the global model's, known to :meth:`aggregate`) no update at all is valid: an empty
        Poisson sample sums to zero and the round still releases its noise (McMahan et al. 2018,
        Algorithm 1). Without it the shapes come from the first update, so at least one is needed.
        """
        num_updates = len(deltas)
        if spec is None or num_updates:
            self.check_num_updates(num_updates)
        if len(num_examples) != num_updates:
            raise FlcoreError(
                f"Got {num_updates} updates but {len(num_examples)} num_examples; "
                "expected one count per update."
            )
        for i, examples in enumerate(num_examples):
            if isinstance(examples, bool) or not isinstance(examples, int | np.integer) or examples < 1:
                raise FlcoreError(
                    f"num_examples of update {i} must be a positive integer. Found {examples!r}."
                )
        if spec is None:
            spec = ParameterSpec.from_parameters(deltas[0])
        for delta in deltas:
            spec.validate(delta)
        if not deltas:
            return spec.zeros(), 0
        norms = [l2_norm(d) for d in deltas]
        for i, norm in enumerate(norms):
            if not math.isfinite(norm):
                raise FlcoreError(f"Update {i} contains NaN or Inf; every value must be finite.")
        weights = np.array([self.update_weight(k, s) for k, s in zip(num_examples, norms, strict=True)])
        scales = np.array([self.update_scale(s) for s in norms], dtype=np.float64)
        num_unclipped = sum(self.unclipped_indicator(s) for s in norms)
        if streaming is None or streaming:
            accumulator = self.accumulator(spec, chunk_size=chunk_size or STREAMING_CHUNK_SIZE)
            for delta, weight, factor in zip(deltas, weights, scales, strict=True):
                accumulator.add(delta, float(weight), scale=float(factor))
            return accumulator.sum(), num_unclipped
        summed, _, _ = self._combine_chunked(spec, deltas, weights, scales, chunk_size)
        return summed, num_unclipped

    def round_metrics(self, num_updates: int) -> dict[str, float]:
        """Return the DP-safe metrics of a round: ``num_updates``, ``dp_clip_norm``, ``dp_noise_multiplier``,
        ``dp_noise_stddev`` (per coordinate of the released mean). No exact clipped or unclipped counts.
        """
        return {
            "num_updates": float(num_updates),
            "dp_clip_norm": self.round_clip_norm,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_stddev": self.noise_stddev(),
        }

    _metrics = round_metrics  # the name the server's first integration calls

    def combine(
        self,
        deltas: Sequence[Parameters],
        num_examples: Sequence[int],
        *,
        chunk_size: int | None = None,
        streaming: bool | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[Parameters, dict[str, float]]:
        """Return the noised fixed-denominator mean of the clipped deltas and DP-safe metrics.

        ``num_examples`` is validated but does not weight the sum. Clips with the bound clip norm
        (:meth:`for_state`); the adaptive clip update needs the state, so it is done by :meth:`aggregate`
        or :meth:`adapt_clip_norm`.

        Raises
        ------
        FlcoreError
            Without ``rng``, and for the base class's invalid inputs.
        """
        source = generator(rng)
        summed, _ = self._clipped_sum(deltas, num_examples, chunk_size, streaming)
        return self.noised_mean(summed, len(deltas), source), self.round_metrics(len(deltas))

    def aggregate(
        self,
        base: Parameters,
        deltas: Sequence[Parameters],
        num_examples: Sequence[int],
        state: ServerState,
        *,
        chunk_size: int | None = None,
        streaming: bool | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[Parameters, ServerState, dict[str, float]]:
        """Run one central-DP round in process: clip, sum, noise, divide by ``m``, inner step, adapt ``C``.

        The draws from ``rng`` are, in order: the noise on the sum (tensor by tensor), then (adaptive
        clipping only) one normal draw for the clipped count.

        Returns
        -------
        tuple of (Parameters, ServerState, dict)
            New global parameters, new state (with the next ``dp_clip_norm``) and metrics:
            ``num_updates``, ``pseudo_gradient_norm`` (of the noised ``Delta``), ``dp_clip_norm`` (this
            round's), ``dp_noise_multiplier``, ``dp_noise_stddev`` and, with adaptive clipping,
            ``dp_unclipped_fraction`` (noised) and ``dp_next_clip_norm``.

        Raises
        ------
        FlcoreError
            Without ``rng``, for an invalid state, and for the base class's invalid inputs.
        """
        source = generator(rng)
        spec = ParameterSpec.from_parameters(base)
        for delta in deltas:
            spec.validate(delta)
        self.check_state(state, spec)
        round_dp = self.for_state(state)
        summed, num_unclipped = round_dp._clipped_sum(deltas, num_examples, chunk_size, streaming, spec)
        delta_mean = round_dp.noised_mean(summed, len(deltas), source)
        new_global, new_state = round_dp.apply(base, delta_mean, state)
        new_state, fraction = round_dp.adapt_clip_norm(new_state, num_unclipped, len(deltas), source)
        metrics = round_dp.round_metrics(len(deltas))
        metrics["pseudo_gradient_norm"] = l2_norm(delta_mean)
        if fraction is not None:
            metrics["dp_unclipped_fraction"] = fraction
            metrics["dp_next_clip_norm"] = float(new_state.scalars[CLIP_NORM_SCALAR])
        return new_global, new_state, metrics


def wrap_central_dp(inner: Strategy, **dp_params: Any) -> CentralDp:
    """Return ``inner`` wrapped in client-level central DP (the server does this when a training uses it).

    Parameters
    ----------
    inner : Strategy
        A strategy of one of :data:`ALLOWED_INNER_ALGORITHMS`, with its hyperparameters.
    **dp_params
        ``noise_multiplier``, ``clip_norm``, ``expected_clients_per_round`` (required) and optionally
        ``adaptive_clipping``, ``target_quantile``, ``clip_learning_rate``, ``clipped_count_stddev``.

    Raises
    ------
    ConfigError
        If ``inner`` is not an allowed rule (robust, norm-bounded, asynchronous or already central-DP) or a
        DP parameter is invalid.
    """
    if isinstance(inner, CentralDp) or not isinstance(inner, Strategy):
        raise _refuse_inner(type(inner).__name__)
    if inner.algorithm.value not in ALLOWED_INNER_ALGORITHMS or type(inner).algorithm != inner.algorithm:
        raise _refuse_inner(inner.algorithm.value)
    for key in ("inner", "inner_hyperparameters"):
        if key in dp_params:
            raise ConfigError(f"wrap_central_dp takes the inner rule as a Strategy; do not pass {key!r}.")
    return CentralDp.from_hyperparameters(
        {**dp_params, "inner": inner.algorithm.value, "inner_hyperparameters": inner.hyperparameters()}
    )
