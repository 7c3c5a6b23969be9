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

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _alternated import mlp_update, parse_args, print_table, time_alternated  # noqa: E402

from flcore.parameters import ParameterSpec, l2_norm, load_file, to_bytes, validate_file  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)

    update = mlp_update(args.params)
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
        times = time_alternated(sides, args.reps, args.calls)

    title = (
        f"one update of {spec.num_parameters:,} float32 ({limit / 2**20:.2f} MiB), {args.reps} reps x "
        f"{args.calls} calls, alternated; ms per call, median (min)"
    )
    print_table(title, times, "validate_file takes")


if __name__ == "__main__":
    main()
