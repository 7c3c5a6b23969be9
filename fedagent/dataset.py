"""An agent's private examples: the local training split and the held-out evaluation split.

Invariants: every array added shares the same per-example shape; labels are 1-D integers; when no
dataset was added with ``split="eval"``, the evaluation split is a seeded random ``eval_fraction`` of the
training examples, which are then removed from the training split (the two never overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class _Part:
    name: str
    split: str
    x: npt.NDArray[Any]
    y: npt.NDArray[np.int64]


class LocalDataset:
    """Private data assembled from one or more named arrays.

    Parameters
    ----------
    eval_fraction : float
        Fraction of training examples held out for evaluation when no eval split was added, in [0, 1).
    seed : int
        Seed of the hold-out draw.
    """

    def __init__(self, *, eval_fraction: float = 0.2, seed: int = 0) -> None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1). Found {eval_fraction!r}.")
        self.eval_fraction = eval_fraction
        self.seed = seed
        self._parts: list[_Part] = []
        self._splits: (
            tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[np.int64]] | None
        ) = None

    def add(self, name: str, x: npt.ArrayLike, y: npt.ArrayLike, split: str = "train") -> None:
        """Add examples ``x`` with integer labels ``y`` to ``split`` (``"train"`` or ``"eval"``).

        Raises
        ------
        ValueError
            If the split is unknown, the arrays are empty or disagree in length, labels are not 1-D integers,
            or the example shape differs from earlier datasets.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'eval'. Found {split!r}.")
        x_array = np.asarray(x)
        y_array = np.asarray(y)
        if x_array.ndim < 1 or len(x_array) == 0:
            raise ValueError(f"Dataset {name!r} has no examples.")
        if y_array.ndim != 1 or len(y_array) != len(x_array):
            raise ValueError(
                f"Dataset {name!r}: y must be 1-D with one label per example; "
                f"found x of shape {x_array.shape} and y of shape {y_array.shape}."
            )
        if not np.issubdtype(y_array.dtype, np.integer):
            raise ValueError(f"Dataset {name!r}: labels must be integers. Found dtype {y_array.dtype}.")
        if self._parts and self._parts[0].x.shape[1:] != x_array.shape[1:]:
            raise ValueError(
                f"Dataset {name!r} has examples of shape {x_array.shape[1:]}; earlier datasets have "
                f"{self._parts[0].x.shape[1:]}."
            )
        self._parts.append(_Part(name, split, x_array, y_array.astype(np.int64)))
        self._splits = None

    def _build(
        self,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[Any], npt.NDArray[np.int64]]:
        if self._splits is not None:
            return self._splits
        train = [p for p in self._parts if p.split == "train"]
        evaluation = [p for p in self._parts if p.split == "eval"]
        example_shape = self._parts[0].x.shape[1:] if self._parts else (0,)
        empty_x = np.zeros((0, *example_shape), dtype=np.float32)
        empty_y = np.zeros(0, dtype=np.int64)
        x_train = np.concatenate([p.x for p in train]) if train else empty_x
        y_train = np.concatenate([p.y for p in train]) if train else empty_y
        if evaluation:
            x_eval = np.concatenate([p.x for p in evaluation])
            y_eval = np.concatenate([p.y for p in evaluation])
        else:
            n = len(y_train)
            num_eval = round(self.eval_fraction * n)
            # At least one held-out example when asked for any, and never all of them.
            num_eval = min(max(num_eval, 1), n - 1) if self.eval_fraction > 0 and n >= 2 else 0
            order = np.random.default_rng(self.seed).permutation(n)
            eval_idx, train_idx = np.sort(order[:num_eval]), np.sort(order[num_eval:])
            x_eval, y_eval = x_train[eval_idx], y_train[eval_idx]
            x_train, y_train = x_train[train_idx], y_train[train_idx]
        self._splits = (x_train, y_train, x_eval, y_eval)
        return self._splits

    @property
    def train(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        """``(x, y)`` of the local training split."""
        x_train, y_train, _, _ = self._build()
        return x_train, y_train

    @property
    def evaluation(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        """``(x, y)`` of the held-out evaluation split (possibly empty)."""
        _, _, x_eval, y_eval = self._build()
        return x_eval, y_eval

    def summary(self) -> dict[str, Any]:
        """Sizes per dataset and split, for the capabilities reported to the server."""
        x_train, _, x_eval, _ = self._build()
        return {
            "datasets": [{"name": p.name, "split": p.split, "num_examples": len(p.y)} for p in self._parts],
            "num_train_examples": len(x_train),
            "num_eval_examples": len(x_eval),
        }
