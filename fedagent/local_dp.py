"""Local differential privacy: the agent clips its delta and adds noise before the upload leaves it.

:class:`LocalDpTransform` is a client ``update_transform``: ``Delta -> clip(Delta) + noise``.

- ``gaussian``: clip to L2 norm ``C`` (:func:`flcore.dp.clipping.clip_by_l2_norm`), add ``N(0, (z C)^2)``
  per coordinate (:func:`flcore.dp.mechanisms.add_gaussian_noise`).
- ``laplace``: clip to L1 norm ``C`` (:func:`flcore.dp.clipping.clip_by_l1_norm`), add ``Lap(z C)`` per
  coordinate (:func:`flcore.dp.mechanisms.add_laplace_noise`): the Laplace mechanism needs the L1 bound.

Sensitivity in local DP: two neighbouring inputs are ANY two deltas of this agent, so the clipped delta
has sensitivity ``2C`` (the diameter of the norm ball), not ``C`` as for adding or removing one client in
central DP. With noise ``z C``, the upload is therefore a Gaussian mechanism with multiplier ``z / 2``
(resp. ``epsilon = 2 / z`` for Laplace). :meth:`LocalDpConfig.calibrated` turns a target
``(epsilon, delta)`` into ``z`` with that sensitivity: ``sigma = analytic_gaussian_sigma(epsilon, delta,
2C)`` (Balle and Wang 2018) or ``b = 2C / epsilon`` (Dwork and Roth 2014, Theorem 3.6).

The server can require local DP for a training: the task config then holds
``"local_dp": {"mechanism", "clip_norm", "noise_multiplier"}``. An agent built with :func:`local_dp_hooks`
(the command line always is) reads it through its trainer (:class:`LocalDpTrainer`, the key reaches the
trainer in ``FitConfig.extra``) and MUST apply it: it overrides the agent's own settings, and if it cannot
be applied (malformed, unknown mechanism, or the agent simulates an attack) the transform raises, so the
client gives the task back instead of uploading.

Distributed DP (the Skellam mechanism, :mod:`flcore.dp.skellam`): with secure aggregation the server sees
only the sum of the agents' vectors, so each agent adds its SHARE of integer noise, and the noise of the
sum is the mechanism. :func:`distributed_dp_share` turns a delta into that share, from the round's
parameters as the server sends them (``"distributed_dp"``: :meth:`SkellamParameters.to_json`): clip,
scale, rotate, conditionally round, add ``Sk(agent_mu)``, reduce into ``Z_(2^bits)``. The secure
aggregation layer masks and uploads it (its REST wiring is issue 8's next part).

Invariants: the noise comes from the explicit ``rng`` (the command line seeds it from the operating system,
``np.random.default_rng(secrets.randbits(128))``; numpy's generator is not cryptographically secure, see
:mod:`flcore.dp`); clipping always happens before the noise; outputs are new float32 arrays with the
delta's names and shapes; every upload's noise standard deviation is logged. :mod:`flcore.dp` (which
imports scipy) is imported only where noise is calibrated, drawn or encoded: ``python -m fedagent run``
always installs these hooks, and an agent without local DP must not pay that start-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagent.attacks import default_trainer
from fedagent.errors import AgentError
from fedagent.protocol import ModelRef
from fedagent.trainer import EvalResult, FitConfig, FitResult, Trainer
from flcore.errors import FlcoreError
from flcore.parameters import Parameters

__all__ = [
    "DISTRIBUTED_TASK_CONFIG_KEY",
    "MECHANISMS",
    "TASK_CONFIG_KEY",
    "LocalDpConfig",
    "LocalDpHooks",
    "LocalDpTrainer",
    "LocalDpTransform",
    "TaskRequirement",
    "distributed_dp_share",
    "local_dp_hooks",
]

MECHANISMS = ("gaussian", "laplace")
"""The local noise mechanisms."""

TASK_CONFIG_KEY = "local_dp"
"""Task config key by which the server requires local DP."""

DISTRIBUTED_TASK_CONFIG_KEY = "distributed_dp"
"""Task config key by which the server sends a round's Skellam parameters."""

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Local DP {name} must be a finite number above 0. Found {value!r}.")
    return float(value)


@dataclass(frozen=True)
class LocalDpConfig:
    """What local DP does to each upload.

    Parameters
    ----------
    mechanism : {"gaussian", "laplace"}
        Gaussian noise on an L2-clipped delta, or Laplace noise on an L1-clipped delta.
    clip_norm : float
        ``C > 0``: the L2 (gaussian) or L1 (laplace) bound of the delta.
    noise_multiplier : float
        ``z > 0``: the noise has standard deviation ``z C`` (gaussian) or scale ``b = z C`` (laplace).
    """

    mechanism: str
    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"Unknown local DP mechanism {self.mechanism!r}; expected one of {list(MECHANISMS)}."
            )
        object.__setattr__(self, "clip_norm", _positive("clip_norm", self.clip_norm))
        object.__setattr__(self, "noise_multiplier", _positive("noise_multiplier", self.noise_multiplier))

    @property
    def noise_scale(self) -> float:
        """``z C``: the Gaussian standard deviation, or the Laplace scale ``b``."""
        return self.noise_multiplier * self.clip_norm

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the noise per coordinate (``z C``, or ``sqrt(2) z C`` for Laplace)."""
        return self.noise_scale * (math.sqrt(2.0) if self.mechanism == "laplace" else 1.0)

    @classmethod
    def calibrated(
        cls, mechanism: str, clip_norm: float, epsilon: float, delta: float | None = None
    ) -> LocalDpConfig:
        """Return the config whose every upload is ``(epsilon, delta)``-locally-DP (sensitivity ``2C``).

        ``gaussian``: ``z = analytic_gaussian_sigma(epsilon, delta, 2C) / C`` (Balle and Wang 2018,
        Algorithm 1); ``laplace``: ``z = laplace_scale(epsilon, 2C) / C = 2 / epsilon`` (Dwork and Roth 2014,
        Theorem 3.6), which takes no ``delta``.

        Raises
        ------
        ValueError
            For an invalid value, a missing ``delta`` (gaussian) or a ``delta`` given for laplace.
        """
        from flcore.dp.calibration import analytic_gaussian_sigma, laplace_scale

        bound = _positive("clip_norm", clip_norm)
        eps = _positive("epsilon", epsilon)
        if mechanism == "gaussian":
            if delta is None:
                raise ValueError("Local DP with the gaussian mechanism needs a delta as well as an epsilon.")
            sigma = analytic_gaussian_sigma(eps, _positive("delta", delta), 2.0 * bound)
            return cls(mechanism, bound, sigma / bound)
        if mechanism == "laplace":
            if delta is not None:
                raise ValueError("The laplace mechanism is pure epsilon-DP; do not give a delta.")
            return cls(mechanism, bound, laplace_scale(eps, 2.0 * bound) / bound)
        raise ValueError(f"Unknown local DP mechanism {mechanism!r}; expected one of {list(MECHANISMS)}.")

    @classmethod
    def from_task_config(cls, value: Any) -> LocalDpConfig:
        """Build from a task config's ``"local_dp"``: ``{"mechanism", "clip_norm", "noise_multiplier"}``.

        Raises
        ------
        ValueError
            If it is not such an object or a value is invalid.
        """
        keys = {"mechanism", "clip_norm", "noise_multiplier"}
        if not isinstance(value, Mapping) or set(value) != keys:
            raise ValueError(
                f"The task's {TASK_CONFIG_KEY!r} must be an object with exactly the keys {sorted(keys)}. "
                f"Found {value!r}."
            )
        return cls(value["mechanism"], value["clip_norm"], value["noise_multiplier"])

    def describe(self) -> str:
        """One line for logs."""
        norm = "L2" if self.mechanism == "gaussian" else "L1"
        return (
            f"{self.mechanism} ({norm} clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:g})"
        )


def apply_local_dp(
    delta: Parameters, config: LocalDpConfig, rng: np.random.Generator
) -> tuple[Parameters, float]:
    """Clip ``delta`` then add the configured noise; return the noised delta and the original norm."""
    from flcore.dp.clipping import clip_by_l1_norm, clip_by_l2_norm
    from flcore.dp.mechanisms import add_gaussian_noise, add_laplace_noise

    if config.mechanism == "gaussian":
        clipped, norm, _ = clip_by_l2_norm(delta, config.clip_norm)
        return add_gaussian_noise(clipped, config.noise_scale, rng), norm
    clipped, norm, _ = clip_by_l1_norm(delta, config.clip_norm)
    return add_laplace_noise(clipped, config.noise_scale, rng), norm


@dataclass
class TaskRequirement:
    """What the current task's config says about local DP, passed from the trainer to the transform.

    Attributes
    ----------
    seen : bool
        Whether a task's config has been read since the last upload.
    value : Any
        The task config's ``"local_dp"`` value, or None when the task did not require local DP.
    """

    seen: bool = False
    value: Any = None

    def record(self, config: FitConfig) -> None:
        """Remember the task's requirement (called by :class:`LocalDpTrainer.fit`)."""
        self.seen = True
        self.value = config.extra.get(TASK_CONFIG_KEY)

    def take(self) -> Any:
        """Return the requirement and forget it, so a later task never reuses it (None if none)."""
        value, self.value, self.seen = self.value, None, False
        return value


class LocalDpTrainer(Trainer):
    """Wraps a trainer to read the task's ``"local_dp"`` requirement from the config it is fitted with."""

    def __init__(self, inner: Trainer, requirement: TaskRequirement) -> None:
        self.inner = inner
        self.requirement = requirement

    def get_parameters(self) -> Parameters:
        """Delegate to the wrapped trainer."""
        return self.inner.get_parameters()

    def set_parameters(self, parameters: Parameters) -> None:
        """Delegate to the wrapped trainer."""
        self.inner.set_parameters(parameters)

    def fit(
        self,
        x: npt.NDArray[Any],
        y: npt.NDArray[np.integer[Any]],
        config: FitConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Record the task's local DP requirement, then fit."""
        self.requirement.record(config)
        return self.inner.fit(x, y, config, rng)

    def evaluate(self, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]) -> EvalResult:
        """Delegate to the wrapped trainer."""
        return self.inner.evaluate(x, y)


class LocalDpTransform:
    """An ``update_transform`` that clips the delta and adds local DP noise before upload.

    Parameters
    ----------
    config : LocalDpConfig, optional
        The agent's own setting (e.g. from the command line); None: no local DP unless a task requires it.
    rng : numpy.random.Generator
        Source of the noise; in production ``np.random.default_rng(secrets.randbits(128))``.
    requirement : TaskRequirement, optional
        Filled by a :class:`LocalDpTrainer` with the current task's ``"local_dp"``; it overrides ``config``.
    attack : callable, optional
        A simulated attack (:class:`fedagent.attacks.UpdateAttack`) applied to the honest delta when no local
        DP is in force; combining it with local DP is refused.
    logger : logging.Logger, optional
        Gets one INFO line per noised upload, with the noise standard deviation.
    """

    def __init__(
        self,
        config: LocalDpConfig | None = None,
        *,
        rng: np.random.Generator,
        requirement: TaskRequirement | None = None,
        attack: Callable[[Parameters], Parameters] | None = None,
        logger: Logger | None = None,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator. Found {type(rng).__name__}.")
        if attack is not None and config is not None:
            raise ValueError(
                "Refusing to combine a simulated attack with local DP: a poisoned update is not a private "
                "release of this agent's data, and noising it would hide what the experiment measures. "
                "Use either --attack or --local-dp."
            )
        self.config = config
        self.rng = rng
        self.requirement = requirement
        self.attack = attack
        self._log = logger or logging.getLogger("fedagent.local_dp")
        self.count = 0
        self.last_noise_stddev: float | None = None

    def resolve(self) -> LocalDpConfig | None:
        """Return the config in force for this upload: the task's requirement if any, else the agent's.

        Raises
        ------
        AgentError
            If the task requires local DP and it cannot be applied (malformed, or an attack is simulated).
        """
        required = self.requirement.take() if self.requirement is not None else None
        if required is None:
            return self.config
        try:
            config = LocalDpConfig.from_task_config(required)
        except ValueError as exc:
            raise AgentError(
                f"The task requires local DP but the agent cannot apply it, so it will not upload: {exc}"
            ) from None
        if self.attack is not None:
            raise AgentError(
                "The task requires local DP but this agent simulates an attack; refusing to combine them "
                "(the update is not uploaded)."
            )
        if self.config is not None and self.config != config:
            self._log.warning(
                "the task requires local DP %s; it overrides this agent's %s",
                config.describe(),
                self.config.describe(),
            )
        return config

    def __call__(self, delta: Parameters) -> Parameters:
        """Return ``clip(delta) + noise`` under the config in force (else the delta, or the attack's)."""
        config = self.resolve()
        if config is None:
            self.last_noise_stddev = None
            return self.attack(delta) if self.attack is not None else delta
        noised, norm = apply_local_dp(delta, config, self.rng)
        self.count += 1
        self.last_noise_stddev = config.noise_stddev
        self._log.info(
            "local DP: %s; delta norm %.4g clipped to %g, noise stddev %.4g per coordinate",
            config.mechanism,
            norm,
            config.clip_norm,
            config.noise_stddev,
        )
        return noised


@dataclass(frozen=True)
class LocalDpHooks:
    """What to pass to :class:`~fedagent.client.FederatedClient` for local DP (and task-required local DP)."""

    update_transform: LocalDpTransform
    trainer_factory: Callable[[ModelRef], Trainer]


def local_dp_hooks(
    config: LocalDpConfig | None,
    *,
    rng: np.random.Generator,
    trainer_factory: Callable[[ModelRef], Trainer] | None = None,
    attack: Callable[[Parameters], Parameters] | None = None,
    logger: Logger | None = None,
) -> LocalDpHooks:
    """Build the client hooks that apply local DP: the agent's ``config`` and any task's ``"local_dp"``.

    Install them even without a ``config``, so that a training that requires local DP is honoured.

    Parameters
    ----------
    config : LocalDpConfig or None
        The agent's own local DP setting.
    rng : numpy.random.Generator
        Source of the noise.
    trainer_factory : callable, optional
        The factory to wrap (default: the client's default, a zoo trainer), e.g. an attack's.
    attack : callable, optional
        A simulated attack's ``update_transform``, applied when no local DP is in force; with a ``config``
        it is refused (ValueError), and a task requiring local DP is given back.

    Examples
    --------
    >>> rng = np.random.default_rng(secrets.randbits(128))
    >>> hooks = local_dp_hooks(LocalDpConfig("gaussian", 1.0, 0.5), rng=rng)
    >>> client = FederatedClient(agent_id="a", server=url, token=token,
    ...     update_transform=hooks.update_transform, trainer_factory=hooks.trainer_factory)
    """
    requirement = TaskRequirement()
    transform = LocalDpTransform(config, rng=rng, requirement=requirement, attack=attack, logger=logger)
    base = trainer_factory or default_trainer

    def factory(model: ModelRef) -> Trainer:
        return LocalDpTrainer(base(model), requirement)

    return LocalDpHooks(transform, factory)


def distributed_dp_share(
    delta: Parameters, round_parameters: Any, rng: np.random.Generator, *, logger: Logger | None = None
) -> npt.NDArray[np.int64]:
    """Return this agent's share of the round's distributed Skellam mechanism, in ``Z_(2^bits)``.

    ``round_parameters`` is the task's ``"distributed_dp"`` object (:meth:`SkellamParameters.to_json`).
    The share is ``clip -> scale -> rotate -> conditional rounding -> + Sk(agent_mu)``
    (:func:`flcore.dp.skellam.skellam_encode`), reduced modulo ``2^bits``; ``padded_dimension`` integers.

    Raises
    ------
    AgentError
        If the parameters are malformed or do not fit the delta: the agent must not upload a share whose
        noise or sensitivity differs from what the server accounted.
    """
    from flcore.dp.skellam import SkellamParameters, skellam_encode, to_modular

    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator. Found {type(rng).__name__}.")
    try:
        parameters = SkellamParameters.from_json(round_parameters)
        share = to_modular(skellam_encode(delta, parameters, rng), parameters.bits)
    except FlcoreError as exc:
        raise AgentError(
            f"The task requires distributed DP but the agent cannot apply it, so it will not upload: {exc}"
        ) from None
    (logger or logging.getLogger("fedagent.local_dp")).info(
        "distributed DP: Skellam share of %d integers mod 2^%d (clip %g, scale %.6g, agent mu %.6g)",
        share.shape[0],
        parameters.bits,
        parameters.clip_norm,
        parameters.scale,
        parameters.agent_mu,
    )
    return share
