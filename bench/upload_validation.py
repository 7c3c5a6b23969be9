"""An upload's validation on the server: ``load_file`` + ``l2_norm`` against ``validate_file``, side by side.

What ``trainings.services.updates`` does with an agent's spooled update before it becomes a blob: the
safetensors checks (size, header, dtypes, names and shapes against the model's spec, every value finite)
and the update's float64 L2 norm. Before issue 12 it called :func:`flcore.parameters.load_file` (the file
read into bytes, copied into arrays by safetensors, a NaN/Inf mask) and then :func:`flcore.parameters.l2_norm`
(a float64 copy); now it calls :func:`flcore.parameters.validate_file` (the file mapped, its values widened
to float64 one cache-sized block at a time). One file of P float32 parameters in a temporary directory
(page cache warm), the two calls alternated ``--reps`` times, each timing ``--calls`` calls; the norms are
checked equal to 1e-12 first.

Usage::

    .venv/bin/python bench/upload_validation.py --params 1000000 --reps 5 --calls 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flcore.parameters import ParameterSpec, l2_norm, load_file, to_bytes, validate_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 parameters in the update")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per side")
    parser.add_argument("--calls", type=int, default=50, help="calls timed per repetition")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hidden = max(1, args.params // 800)  # a 784-h-10 MLP's shapes, about P parameters
    update = {
        "layer0.weight": rng.standard_normal((784, hidden), dtype=np.float32),
        "layer0.bias": rng.standard_normal(hidden, dtype=np.float32),
        "layer1.weight": rng.standard_normal((hidden, 10), dtype=np.float32),
        "layer1.bias": rng.standard_normal(10, dtype=np.float32),
    }
    spec = ParameterSpec.from_parameters(update)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as directory:
        path = Path(directory) / "update.safetensors"
        path.write_bytes(to_bytes(update))
        limit = path.stat().st_size
        sides = {
            "load_file + l2_norm (before)": lambda: l2_norm(load_file(path, spec=spec, max_bytes=limit)),
            "validate_file (now)": lambda: validate_file(path, spec=spec, max_bytes=limit),
        }
        norms = [side() for side in sides.values()]  # also warms the page cache and both code paths
        if abs(norms[0] - norms[1]) > 1e-12 * norms[0]:
            raise SystemExit(f"the norms differ: {norms}")
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.reps):
            for name, side in sides.items():
                started = time.perf_counter()
                for _ in range(args.calls):
                    side()
                times[name].append((time.perf_counter() - started) / args.calls)

    print(
        f"one update of {spec.num_parameters:,} float32 ({limit / 2**20:.2f} MiB), {args.reps} reps x "
        f"{args.calls} calls, alternated; ms per call, median (min)"
    )
    print()
    print("| side | ms per update |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {1e3 * statistics.median(values):.2f} ({1e3 * min(values):.2f}) |")
    before, now = (statistics.median(values) for values in times.values())
    print()
    print(f"validate_file takes {now / before:.2f}x the time of load_file + l2_norm (medians)")


if __name__ == "__main__":
    main()
