"""Simulated model-poisoning attacks, for robustness experiments only: an attacking agent uploads a
crafted update instead of its honest delta.

Never on by default: an agent attacks only when built with :func:`attack_hooks` (the command line's
``--attack``), and then logs a WARNING line for every poisoned update. The attacks replace the delta
through the client's ``update_transform`` hook; ALIE also wraps the trainer (``trainer_factory``) so that
it can train the extra honest deltas its estimate needs.

- ``sign_flip``: send ``-scale * delta`` (a reversed-gradient attack, e.g. Damaskinos et al. 2018).
- ``gaussian``: send ``N(0, sigma^2)`` noise of the delta's shape (the "Gaussian attack" of Blanchard
  et al. 2017, Section 5, and Fang et al. 2020).
- ``scaling``: send ``scale * delta``, the boosting of Bagdasaryan et al. (2020), "How To Backdoor
  Federated Learning", AISTATS, Section 4 (they boost by about ``n / eta``).
- ``alie``: "A Little Is Enough", Baruch, Baruch and Goldberg (2019), NeurIPS, Algorithm 1: every
  attacker sends ``mu - z_max * sigma`` per coordinate, where ``mu`` and ``sigma`` are the coordinate-wise
  mean and standard deviation of the benign updates and ``z_max = Phi^-1((n - s) / n)`` with
  ``s = floor(n / 2 + 1) - f`` "supporters" (``n`` agents, ``f`` attackers; see :func:`alie_z`).

ALIE without server help: an agent cannot see the other agents' updates, so by default it estimates ``mu``
and ``sigma`` from ``K`` honest deltas it trains itself, from the same global model, on ``K`` disjoint
partitions of its own training data (:class:`OwnDataEstimator`). The paper's attackers likewise use "the
mean and standard deviation of the correct workers" computed from the data they hold (Section 4); with a
single attacker's data the estimated ``sigma`` reflects only this agent's sampling noise, not the spread
between agents, so on non-IID data it underestimates the benign spread and the attack is weaker (and
stealthier) than the omniscient one. For benchmarks, :class:`ReferenceDataEstimator` is the omniscient
variant: it trains on the data of the benign agents, which the benchmark passes in.

Invariants: every function that draws randomness takes an explicit ``rng: numpy.random.Generator``
(those that draw none take it too, so every attack has the same signature); outputs are new float32
arrays with the delta's names and shapes; inputs are never modified.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedagent.errors import AgentError
from fedagent.protocol import ModelRef
from fedagent.trainer import EvalResult, FitConfig, FitResult, Trainer, ZooTrainer
from flcore.parameters import Parameters, subtract

__all__ = [
    "AttackConfig",
    "AttackHooks",
    "AttackKind",
    "BenignStatistics",
    "EstimatingTrainer",
    "OwnDataEstimator",
    "ReferenceDataEstimator",
    "StatisticsBox",
    "UpdateAttack",
    "alie",
    "alie_z",
    "attack_hooks",
    "benign_statistics",
    "gaussian",
    "scaling",
    "sign_flip",
]

#: Default factor of ``scaling`` (about ``n / eta`` for 10 agents and a server learning rate of 1).
DEFAULT_SCALING_FACTOR = 10.0
#: Default number of honest deltas an ALIE attacker trains to estimate the benign statistics.
DEFAULT_NUM_ESTIMATES = 4

Labels = npt.NDArray[np.integer[Any]]


class AttackKind(enum.StrEnum):
    """The simulated attacks."""

    SIGN_FLIP = "sign_flip"
    GAUSSIAN = "gaussian"
    SCALING = "scaling"
    ALIE = "alie"


# ---------------------------------------------------------------------------------------------------
# The attacks, as pure functions
# ---------------------------------------------------------------------------------------------------
def sign_flip(delta: Parameters, *, scale: float = 1.0, rng: np.random.Generator) -> Parameters:
    """Return ``-scale * delta`` (reversed update); ``rng`` is unused (no randomness)."""
    del rng
    return {name: (-np.float32(scale) * np.asarray(array, dtype=np.float32)) for name, array in delta.items()}


def gaussian(delta: Parameters, *, sigma: float, rng: np.random.Generator) -> Parameters:
    """Return ``N(0, sigma^2)`` noise of the delta's names and shapes (the delta's values are ignored)."""
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number of at least 0. Found {sigma!r}.")
    return {
        name: rng.normal(0.0, sigma, size=np.shape(array)).astype(np.float32) for name, array in delta.items()
    }


def scaling(delta: Parameters, *, factor: float, rng: np.random.Generator) -> Parameters:
    """Return ``factor * delta`` (Bagdasaryan et al. 2020, Section 4, boosting); ``rng`` is unused."""
    del rng
    return {name: np.float32(factor) * np.asarray(array, dtype=np.float32) for name, array in delta.items()}


def alie_z(num_agents: int, num_attackers: int) -> float:
    """Return ALIE's ``z_max`` (Baruch et al. 2019, Algorithm 1, lines 1-2).

    ``s = floor(n / 2 + 1) - f`` benign agents must be "supporters" of the attackers' value for it to win
    a majority-based rule; ``z_max = max_z (Phi(z) < (n - s) / n) = Phi^-1((n - s) / n)``, with ``Phi``
    the standard normal CDF (computed with :meth:`statistics.NormalDist.inv_cdf`, exact to double precision).

    Parameters
    ----------
    num_agents : int
        ``n``, agents per round (attackers included), at least 2.
    num_attackers : int
        ``f``, attackers per round, ``1 <= f < n``.

    Raises
    ------
    ValueError
        If the counts are out of range or leave no quantile in (0, 1) (e.g. ``f`` so large that ``s <= 0``).
    """
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 2:
        raise ValueError(f"num_agents must be an integer of at least 2. Found {num_agents!r}.")
    if isinstance(num_attackers, bool) or not isinstance(num_attackers, int):
        raise ValueError(f"num_attackers must be an integer. Found {num_attackers!r}.")
    if not 1 <= num_attackers < num_agents:
        raise ValueError(
            f"num_attackers must be between 1 and num_agents - 1 = {num_agents - 1}. Found {num_attackers}."
        )
    supporters = math.floor(num_agents / 2 + 1) - num_attackers
    quantile = (num_agents - supporters) / num_agents
    if not 0 < quantile < 1:
        raise ValueError(
            f"With {num_agents} agents and {num_attackers} attackers ALIE needs s = {supporters} supporters, "
            f"so Phi^-1((n - s) / n) = Phi^-1({quantile}) is undefined."
        )
    return NormalDist().inv_cdf(quantile)


@dataclass(frozen=True)
class BenignStatistics:
    """Coordinate-wise mean and standard deviation of benign updates.

    Attributes
    ----------
    mean, std : Parameters
        Per tensor, float32, same names and shapes as the updates.
    num_samples : int
        How many updates they were computed from.
    """

    mean: Parameters
    std: Parameters
    num_samples: int


def benign_statistics(deltas: Sequence[Parameters]) -> BenignStatistics:
    """Coordinate-wise mean and population standard deviation (``ddof=0``) of ``deltas``, in float64.

    Raises
    ------
    ValueError
        If ``deltas`` is empty or the updates disagree on names or shapes.
    """
    if not deltas:
        raise ValueError("benign_statistics needs at least one update. Found 0.")
    names = list(deltas[0])
    mean: Parameters = {}
    std: Parameters = {}
    for name in names:
        arrays = []
        for index, delta in enumerate(deltas):
            if list(delta) != names:
                raise ValueError(f"Update {index} has tensors {list(delta)}; update 0 has {names}.")
            arrays.append(np.asarray(delta[name], dtype=np.float64))
        stacked = np.stack(arrays)
        mean[name] = stacked.mean(axis=0).astype(np.float32)
        std[name] = stacked.std(axis=0).astype(np.float32)
    return BenignStatistics(mean=mean, std=std, num_samples=len(deltas))


def alie(mean: Parameters, std: Parameters, *, z: float, rng: np.random.Generator) -> Parameters:
    """Return ``mean - z * std`` per coordinate (Baruch et al. 2019, Algorithm 1, line 4); ``rng`` unused.

    Raises
    ------
    ValueError
        If ``mean`` and ``std`` disagree on names or shapes.
    """
    del rng
    if list(mean) != list(std):
        raise ValueError(f"mean has tensors {list(mean)}, std has {list(std)}.")
    out: Parameters = {}
    for name, mu in mean.items():
        sigma = std[name]
        if np.shape(mu) != np.shape(sigma):
            raise ValueError(f"Tensor {name!r}: mean has shape {np.shape(mu)}, std has {np.shape(sigma)}.")
        out[name] = (np.asarray(mu, dtype=np.float64) - z * np.asarray(sigma, dtype=np.float64)).astype(
            np.float32
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Estimating the benign statistics (ALIE)
# ---------------------------------------------------------------------------------------------------
class BenignEstimator(Protocol):
    """Estimates the benign updates' statistics of one task from the global model ``start``."""

    def __call__(
        self,
        trainer: Trainer,
        start: Parameters,
        x: npt.NDArray[Any],
        y: Labels,
        config: FitConfig,
        rng: np.random.Generator,
    ) -> BenignStatistics: ...


def _honest_delta(
    trainer: Trainer,
    start: Parameters,
    x: npt.NDArray[Any],
    y: Labels,
    config: FitConfig,
    rng: np.random.Generator,
) -> Parameters:
    trainer.set_parameters({name: array.copy() for name, array in start.items()})
    trainer.fit(x, y, config, rng)
    return subtract(trainer.get_parameters(), start)


def _full_steps(num_examples: int, config: FitConfig) -> int:
    steps = math.ceil(num_examples / config.batch_size) * config.local_epochs
    return steps if config.max_steps is None else min(steps, config.max_steps)


@dataclass(frozen=True)
class OwnDataEstimator:
    """The non-omniscient estimate: honest deltas trained on ``num_partitions`` disjoint parts of own data.

    Each part is trained from the global model for as many SGD steps as the full local run takes (more
    epochs over less data), so the deltas have the magnitude of a real benign update; their spread is this
    agent's sampling noise only (see the module docstring).
    """

    num_partitions: int = DEFAULT_NUM_ESTIMATES

    def __post_init__(self) -> None:
        if isinstance(self.num_partitions, bool) or not isinstance(self.num_partitions, int):
            raise ValueError(f"num_partitions must be an integer. Found {self.num_partitions!r}.")
        if self.num_partitions < 2:
            raise ValueError(f"num_partitions must be at least 2. Found {self.num_partitions}.")

    def __call__(
        self,
        trainer: Trainer,
        start: Parameters,
        x: npt.NDArray[Any],
        y: Labels,
        config: FitConfig,
        rng: np.random.Generator,
    ) -> BenignStatistics:
        """Train one honest delta per disjoint part of ``(x, y)`` and return their statistics."""
        num_examples = len(y)
        if num_examples < self.num_partitions:
            raise AgentError(
                f"ALIE's own-data estimate needs at least {self.num_partitions} training examples "
                f"(one per partition). Found {num_examples}."
            )
        steps = _full_steps(num_examples, config)
        order = rng.permutation(num_examples)
        deltas = []
        for part in np.array_split(order, self.num_partitions):
            steps_per_epoch = math.ceil(len(part) / config.batch_size)
            part_config = replace(config, local_epochs=math.ceil(steps / steps_per_epoch), max_steps=steps)
            deltas.append(_honest_delta(trainer, start, x[part], y[part], part_config, rng))
        return benign_statistics(deltas)


@dataclass(frozen=True)
class ReferenceDataEstimator:
    """The omniscient estimate, for benchmarks: one honest delta per benign agent's data set.

    ``datasets`` are the benign agents' ``(x, y)`` training sets, passed in by the benchmark; each is
    trained from the global model with the task's config, as that agent would.
    """

    datasets: Sequence[tuple[npt.NDArray[Any], Labels]]

    def __post_init__(self) -> None:
        if len(self.datasets) < 2:
            raise ValueError(
                f"ReferenceDataEstimator needs at least 2 data sets. Found {len(self.datasets)}."
            )

    def __call__(
        self,
        trainer: Trainer,
        start: Parameters,
        x: npt.NDArray[Any],
        y: Labels,
        config: FitConfig,
        rng: np.random.Generator,
    ) -> BenignStatistics:
        """Train one honest delta per reference data set (``x``, ``y`` are ignored)."""
        del x, y
        deltas = [_honest_delta(trainer, start, xs, ys, config, rng) for xs, ys in self.datasets]
        return benign_statistics(deltas)


class StatisticsBox:
    """Hands the benign statistics of the current task from :class:`EstimatingTrainer` to the transform."""

    def __init__(self) -> None:
        self.statistics: BenignStatistics | None = None

    def take(self) -> BenignStatistics | None:
        """Return the statistics and forget them, so a later task never reuses a stale estimate."""
        statistics, self.statistics = self.statistics, None
        return statistics


class EstimatingTrainer(Trainer):
    """Wraps a trainer: before its honest :meth:`fit`, estimates the benign statistics into ``box``.

    The estimate draws from a child of the task's generator (``rng.spawn``), so the honest fit sees the
    same random stream as it would without the wrapper.
    """

    def __init__(self, inner: Trainer, estimator: BenignEstimator, box: StatisticsBox) -> None:
        self.inner = inner
        self.estimator = estimator
        self.box = box

    def get_parameters(self) -> Parameters:
        """Delegate to the wrapped trainer."""
        return self.inner.get_parameters()

    def set_parameters(self, parameters: Parameters) -> None:
        """Delegate to the wrapped trainer."""
        self.inner.set_parameters(parameters)

    def fit(
        self,
        x: npt.NDArray[Any],
        y: Labels,
        config: FitConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Estimate the benign statistics from the current (global) parameters, then fit honestly."""
        start = self.inner.get_parameters()
        self.box.statistics = self.estimator(self.inner, start, x, y, config, rng.spawn(1)[0])
        self.inner.set_parameters(start)
        return self.inner.fit(x, y, config, rng)

    def evaluate(self, x: npt.NDArray[Any], y: Labels) -> EvalResult:
        """Delegate to the wrapped trainer."""
        return self.inner.evaluate(x, y)


# ---------------------------------------------------------------------------------------------------
# Configuration and the client hooks
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackConfig:
    """Which attack an agent simulates, and its parameters.

    Parameters
    ----------
    kind : AttackKind or str
        ``sign_flip``, ``gaussian``, ``scaling`` or ``alie``.
    scale : float, optional
        ``sign_flip`` sends ``-scale * delta`` (default 1); ``scaling`` sends ``scale * delta`` (default
        :data:`DEFAULT_SCALING_FACTOR`).
    sigma : float
        Standard deviation of the ``gaussian`` attack's noise, per coordinate.
    num_agents, num_attackers : int, optional
        ALIE's ``n`` and ``f`` (both required for ``alie``).
    num_estimates : int
        ALIE: honest deltas trained on disjoint parts of own data (see :class:`OwnDataEstimator`).
    honest_first : int
        Upload this many honest updates before the first poisoned one (an agent that turns malicious).
    poisoned_count : int, optional
        Poison only this many updates, then upload honest ones again (None: poison every one after
        ``honest_first``). In a synchronous training where the agent is selected every round, updates are
        rounds: ``honest_first=5, poisoned_count=3`` attacks rounds 6 to 8.
    """

    kind: AttackKind
    scale: float | None = None
    sigma: float = 1.0
    num_agents: int | None = None
    num_attackers: int | None = None
    num_estimates: int = DEFAULT_NUM_ESTIMATES
    honest_first: int = 0
    poisoned_count: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", AttackKind(self.kind))
        except ValueError:
            raise ValueError(
                f"Unknown attack {self.kind!r}; available: {[k.value for k in AttackKind]}."
            ) from None
        if self.scale is not None and (not math.isfinite(self.scale) or self.scale <= 0):
            raise ValueError(f"The attack scale must be a finite number above 0. Found {self.scale!r}.")
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ValueError(f"The attack sigma must be a finite number above 0. Found {self.sigma!r}.")
        if (
            isinstance(self.honest_first, bool)
            or not isinstance(self.honest_first, int)
            or self.honest_first < 0
        ):
            raise ValueError(f"honest_first must be an integer >= 0. Found {self.honest_first!r}.")
        if self.poisoned_count is not None and (
            isinstance(self.poisoned_count, bool)
            or not isinstance(self.poisoned_count, int)
            or self.poisoned_count < 1
        ):
            raise ValueError(
                f"poisoned_count must be an integer >= 1 (or None). Found {self.poisoned_count!r}."
            )
        if self.kind is AttackKind.ALIE:
            if self.num_agents is None or self.num_attackers is None:
                raise ValueError("The alie attack needs num_agents (n) and num_attackers (f).")
            alie_z(self.num_agents, self.num_attackers)  # validates n and f
            OwnDataEstimator(self.num_estimates)  # validates num_estimates

    @property
    def factor(self) -> float:
        """The multiplier of ``sign_flip`` (its magnitude) and ``scaling``."""
        if self.scale is not None:
            return self.scale
        return DEFAULT_SCALING_FACTOR if self.kind is AttackKind.SCALING else 1.0

    @property
    def z(self) -> float:
        """ALIE's ``z_max`` for this config's ``n`` and ``f``."""
        if self.num_agents is None or self.num_attackers is None:
            raise ValueError("z is only defined for the alie attack (num_agents and num_attackers).")
        return alie_z(self.num_agents, self.num_attackers)

    def poisons(self, index: int) -> bool:
        """Whether the agent's ``index``-th update (1-based) is poisoned."""
        if index <= self.honest_first:
            return False
        return self.poisoned_count is None or index <= self.honest_first + self.poisoned_count

    def describe(self) -> str:
        """One line for logs, e.g. ``sign_flip (scale 1)``."""
        if self.kind is AttackKind.GAUSSIAN:
            what = f"gaussian (sigma {self.sigma:g})"
        elif self.kind is AttackKind.ALIE:
            what = f"alie (n {self.num_agents}, f {self.num_attackers}, z {self.z:.4f})"
        else:
            what = f"{self.kind.value} (scale {self.factor:g})"
        if self.honest_first or self.poisoned_count is not None:
            last = "on" if self.poisoned_count is None else str(self.honest_first + self.poisoned_count)
            what += f", updates {self.honest_first + 1} to {last}"
        return what


class UpdateAttack:
    """An ``update_transform`` that replaces the honest delta with the configured attack's update.

    Parameters
    ----------
    config : AttackConfig
        The attack.
    rng : numpy.random.Generator
        Source of the ``gaussian`` noise.
    box : StatisticsBox, optional
        Where an :class:`EstimatingTrainer` leaves the benign statistics (required for ``alie``).
    logger : logging.Logger, optional
        Gets one WARNING line per poisoned update.
    """

    def __init__(
        self,
        config: AttackConfig,
        *,
        rng: np.random.Generator,
        box: StatisticsBox | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        if config.kind is AttackKind.ALIE and box is None:
            raise ValueError("The alie attack needs a StatisticsBox filled by an EstimatingTrainer.")
        self.config = config
        self.rng = rng
        self.box = box
        self._log = logger or logging.getLogger("fedagent.attacks")
        self.count = 0
        self.seen = 0

    def __call__(self, delta: Parameters) -> Parameters:
        """Return the poisoned update for the honest ``delta`` (or ``delta`` itself outside the window)."""
        config = self.config
        self.seen += 1
        if not config.poisons(self.seen):
            if self.box is not None:
                self.box.take()  # this task's estimate must not leak into a later poisoned one
            self._log.info("attack simulation: update %d is honest (%s)", self.seen, config.describe())
            return delta
        if config.kind is AttackKind.SIGN_FLIP:
            poisoned = sign_flip(delta, scale=config.factor, rng=self.rng)
        elif config.kind is AttackKind.GAUSSIAN:
            poisoned = gaussian(delta, sigma=config.sigma, rng=self.rng)
        elif config.kind is AttackKind.SCALING:
            poisoned = scaling(delta, factor=config.factor, rng=self.rng)
        else:
            statistics = self.box.take() if self.box is not None else None
            if statistics is None:
                raise AgentError(
                    "The alie attack has no benign statistics for this task; build the client with "
                    "attack_hooks() so that its trainer estimates them."
                )
            poisoned = alie(statistics.mean, statistics.std, z=config.z, rng=self.rng)
        self.count += 1
        self._log.warning(
            "ATTACK SIMULATION: uploading a poisoned update (%s) instead of the honest one", config.describe()
        )
        return poisoned


@dataclass(frozen=True)
class AttackHooks:
    """What to pass to :class:`~fedagent.client.FederatedClient` to simulate an attack."""

    update_transform: Callable[[Parameters], Parameters]
    trainer_factory: Callable[[ModelRef], Trainer] | None


def default_trainer(model: ModelRef) -> Trainer:
    """The client's default trainer: a :class:`ZooTrainer` for the task's zoo model."""
    if model.spec is None:
        raise AgentError("The task's model is custom (spec is null); pass trainer_factory=... to train it.")
    return ZooTrainer(model.spec)


def attack_hooks(
    config: AttackConfig,
    *,
    rng: np.random.Generator,
    trainer_factory: Callable[[ModelRef], Trainer] | None = None,
    estimator: BenignEstimator | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> AttackHooks:
    """Build the client hooks of an attack.

    For ``alie`` the trainer factory (``trainer_factory``, or :func:`default_trainer`) is wrapped in an
    :class:`EstimatingTrainer` using ``estimator`` (default :class:`OwnDataEstimator` with
    ``config.num_estimates`` parts; pass a :class:`ReferenceDataEstimator` for the omniscient variant).
    Other attacks keep ``trainer_factory`` as given.

    Examples
    --------
    >>> hooks = attack_hooks(AttackConfig("sign_flip"), rng=np.random.default_rng(0))
    >>> client = FederatedClient(agent_id="a", server=url, token=token,
    ...     update_transform=hooks.update_transform, trainer_factory=hooks.trainer_factory)
    """
    if config.kind is not AttackKind.ALIE:
        return AttackHooks(UpdateAttack(config, rng=rng, logger=logger), trainer_factory)
    box = StatisticsBox()
    base = trainer_factory or default_trainer
    chosen: BenignEstimator = estimator or OwnDataEstimator(config.num_estimates)

    def factory(model: ModelRef) -> Trainer:
        return EstimatingTrainer(base(model), chosen, box)

    return AttackHooks(UpdateAttack(config, rng=rng, box=box, logger=logger), factory)
