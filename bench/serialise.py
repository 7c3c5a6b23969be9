"""An update's serialisation at the agent: ``flcore.parameters.to_bytes`` against ``safetensors.numpy.save``.

Every agent serialises its update every round (and the worker each new global model). ``to_bytes`` writes
the safetensors file itself, joining the header and the tensors' buffers in one copy; the library's
``save`` copies each tensor with ``tobytes()`` and then again into its output. A 784-h-10 MLP of about
``--params`` float32 parameters; the two alternated ``--reps`` times, each timing ``--calls`` calls. Both
outputs are first read back with ``safetensors.numpy.load`` and checked to hold the same tensors.

Usage::

    .venv/bin/python bench/serialise.py --params 1000000 --reps 5 --calls 50
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import safetensors.numpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _alternated import mlp_update, parse_args, print_table, time_alternated  # noqa: E402

from flcore.parameters import to_bytes  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)

    update = mlp_update(args.params)
    sides = {
        "safetensors.numpy.save (before)": lambda: safetensors.numpy.save(update),
        "flcore.parameters.to_bytes (now)": lambda: to_bytes(update),
    }
    for name, side in sides.items():
        loaded = safetensors.numpy.load(side())
        if any(not np.array_equal(loaded[key], value) for key, value in update.items()):
            raise SystemExit(f"{name} did not round-trip")
    size = len(to_bytes(update))
    times = time_alternated(sides, args.reps, args.calls)
    params = sum(value.size for value in update.values())
    title = (
        f"one update of {params:,} float32 ({size / 2**20:.2f} MiB), {args.reps} reps x {args.calls} calls, "
        "alternated; ms per call, median (min)"
    )
    print_table(title, times, "to_bytes takes")


if __name__ == "__main__":
    main()
