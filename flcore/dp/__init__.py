"""Differential privacy for federated learning: clipping, noise mechanisms, calibration, adaptive clipping,
client-level central DP-FedAvg and the distributed Skellam mechanism (:mod:`flcore.dp.skellam`).

Invariants kept by every module in this package:

- Pure: numpy, scipy and the standard library only (the privacy accounting with ``dp-accounting`` lives in
  the server's ``privacy`` app, which reads :meth:`CentralDp.privacy_event_parameters`).
- Every function that draws noise takes an explicit ``rng: numpy.random.Generator``. numpy's generators
  (PCG64 by default) are NOT cryptographically secure: their output can be predicted from enough observed
  output or from the seed, and floating-point Gaussian/Laplace samplers have known low-order-bit weaknesses
  (Mironov 2012, "On Significance of the Least Significant Bits for Differential Privacy", CCS). A
  production deployment must at least seed the generator from the operating system's entropy, e.g.
  ``np.random.default_rng(secrets.randbits(128))``, and never from a stored or guessable seed; the server
  does this. Seeded generators are for tests and reproducible experiments only.
- Noise is drawn in float64 and added in float64; results are new float32 arrays in the input's order, and
  inputs are never modified. The Skellam mechanism is the exception: its shares and noise are int64 (it
  runs under secure aggregation's modular arithmetic).
"""

from flcore.dp.adaptive_clipping import (
    AdaptiveClipConfig,
    AdaptiveClipState,
    adaptive_clip_step,
    effective_noise_multiplier,
    geometric_clip_update,
    noised_unclipped_fraction,
    update_noise_multiplier,
)
from flcore.dp.calibration import (
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    gaussian_delta,
    laplace_scale,
)
from flcore.dp.central import ALLOWED_INNER_ALGORITHMS, CLIP_NORM_SCALAR, CentralDp, wrap_central_dp
from flcore.dp.clipping import (
    clip_by_l1_norm,
    clip_by_l2_norm,
    clip_factor,
    clip_per_layer,
    per_layer_clip_norms,
    per_layer_sensitivity,
)
from flcore.dp.mechanisms import add_gaussian_noise, add_laplace_noise, gaussian_noise, laplace_noise
from flcore.dp.skellam import SkellamParameters, skellam_decode, skellam_encode, skellam_noise, skellam_rdp

__all__ = [
    "ALLOWED_INNER_ALGORITHMS",
    "CLIP_NORM_SCALAR",
    "AdaptiveClipConfig",
    "AdaptiveClipState",
    "CentralDp",
    "SkellamParameters",
    "adaptive_clip_step",
    "add_gaussian_noise",
    "add_laplace_noise",
    "analytic_gaussian_sigma",
    "classical_gaussian_sigma",
    "clip_by_l1_norm",
    "clip_by_l2_norm",
    "clip_factor",
    "clip_per_layer",
    "effective_noise_multiplier",
    "gaussian_delta",
    "gaussian_noise",
    "geometric_clip_update",
    "laplace_noise",
    "laplace_scale",
    "noised_unclipped_fraction",
    "per_layer_clip_norms",
    "per_layer_sensitivity",
    "skellam_decode",
    "skellam_encode",
    "skellam_noise",
    "skellam_rdp",
    "update_noise_multiplier",
    "wrap_central_dp",
]
