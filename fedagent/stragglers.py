"""Simulated stragglers (systems heterogeneity), for FedProx experiments: an agent that sometimes does
only part of its local work.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith (2020), "Federated Optimization in Heterogeneous
Networks", MLSys, Section 5.2 ("Systems heterogeneity"): a chosen fraction of the devices are stragglers
that run ``x`` local epochs, ``x`` drawn uniformly at random from ``1..E``; FedProx aggregates their
partial work, while the FedAvg baseline drops them.

Opt-in only: :class:`~fedagent.client.FederatedClient` consults a :class:`StragglerPolicy` when given one
(``--straggle-probability`` on the command line). On each task, with probability ``p``, the agent is a
straggler and either trains a random number of epochs in ``1..E`` (``E`` = the task's ``local_epochs``;
when ``E = 1``, a random number of minibatch steps in ``1..S`` through ``max_steps``, ``S`` the full run's
steps), reporting what it did in ``epochs_completed`` and ``local_steps``, or, with ``drop=True``, gives
the task back (``POST tasks/<id>/fail``) as a dropped FedAvg straggler.

Invariants: the decision is a function of the task's seed and the agent's id only (its own random stream,
independent of the training's), so a task re-run draws the same decision; a straggler's config differs from
the task's only in ``local_epochs`` or ``max_steps``, never asks for more work than the task did.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

from fedagent.trainer import FitConfig

__all__ = ["StragglerDecision", "StragglerPolicy", "straggler_rng"]

#: Mixed into the seed so the straggling stream is independent of the training stream of the same task.
_STRAGGLER_STREAM = 0x57A6


def straggler_rng(seed: int, agent_id: str) -> np.random.Generator:
    """The generator of one task's straggling decision, from the task's ``seed`` and the agent's id."""
    agent_entropy = int.from_bytes(hashlib.sha256(agent_id.encode("utf-8")).digest()[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, agent_entropy, _STRAGGLER_STREAM]))


@dataclass(frozen=True)
class StragglerDecision:
    """What one task's straggling draw decided.

    Attributes
    ----------
    straggles : bool
        Whether the agent straggles on this task.
    drop : bool
        Straggles and gives the task back instead of uploading partial work.
    config : FitConfig
        The config to train with (the task's own when not straggling).
    detail : str
        A sentence for logs and the ``/fail`` reason.
    """

    straggles: bool
    drop: bool
    config: FitConfig
    detail: str = ""


@dataclass(frozen=True)
class StragglerPolicy:
    """Straggle with ``probability`` on each task; partial work (FedProx) or give the task back (``drop``).

    Parameters
    ----------
    probability : float
        Chance of straggling on a task, in [0, 1].
    drop : bool
        Give the task back instead of uploading partial work (the FedAvg baseline of Li et al. 2020).
    """

    probability: float
    drop: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.probability, bool)
            or not isinstance(self.probability, int | float)
            or not 0 <= self.probability <= 1
        ):
            raise ValueError(f"The straggle probability must be in [0, 1]. Found {self.probability!r}.")

    def decide(self, config: FitConfig, *, num_examples: int, rng: np.random.Generator) -> StragglerDecision:
        """Draw whether this task straggles and, if it trains partially, how much work it does.

        Parameters
        ----------
        config : FitConfig
            The task's config.
        num_examples : int
            Local training examples (for the number of steps when ``local_epochs`` is 1).
        rng : numpy.random.Generator
            The task's straggling stream (:func:`straggler_rng`).
        """
        if not rng.random() < self.probability:
            return StragglerDecision(straggles=False, drop=False, config=config)
        if self.drop:
            return StragglerDecision(
                straggles=True,
                drop=True,
                config=config,
                detail="Straggler (simulated): dropping the task instead of uploading partial work.",
            )
        if config.local_epochs > 1:
            epochs = int(rng.integers(1, config.local_epochs, endpoint=True))
            return StragglerDecision(
                straggles=True,
                drop=False,
                config=replace(config, local_epochs=epochs),
                detail=f"Straggler (simulated): {epochs} of {config.local_epochs} local epochs.",
            )
        full_steps = math.ceil(num_examples / config.batch_size)
        if config.max_steps is not None:
            full_steps = min(full_steps, config.max_steps)
        steps = int(rng.integers(1, max(full_steps, 1), endpoint=True))
        return StragglerDecision(
            straggles=True,
            drop=False,
            config=replace(config, max_steps=steps),
            detail=f"Straggler (simulated): {steps} of {full_steps} local steps.",
        )
