"""The kernels' grid constants, owned here and read by every kernel that needs them.

* the ω grid of block 2 (``kernels.gibbs``): the independence-MH proposal is the
  conditional of ω tabulated on ``OMEGA_GRID`` points of log(ω / s) over
  ``OMEGA_RANGE`` and interpolated log-linearly in between; the fused CUDA
  kernel (``kernels.fused``) is compiled for that many points;
* the arrival grid (``kernels.arrival``): ``ARRIVAL_GRID_POINTS`` points of
  logit p per (problem, stratum), over the posterior mean ± ``ARRIVAL_GRID_HALF_WIDTH``
  sd.

Modules read them as ``grids.NAME`` at call time, so a test can change a size
for one run (``monkeypatch.setattr(grids, "OMEGA_GRID", 32)``).
"""

from __future__ import annotations

OMEGA_GRID = 16  # log-linear in between: acceptance ≈ 0.9 (0.98 with 32); MH keeps it exact
OMEGA_RANGE = (-12.0, 2.5)  # log(ω / s): from 6e-6 s to 12 s

ARRIVAL_GRID_POINTS = 512  # spacing ~0.05 sd: the sampled density within ~1e-4 in L1
ARRIVAL_GRID_HALF_WIDTH = 12.0  # in Laplace (first pass) then posterior (second pass) sd
