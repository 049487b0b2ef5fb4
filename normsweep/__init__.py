"""normsweep: Hydra sweeps that compare normalization layers on image classifiers."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning. Set here, before anything of normsweep imports torch
# (which loads its OpenMP runtime, which reads this once), so jobs, the workers a sweep starts and the benchmark all
# run so. On a core that another process also wants, a spinning thread takes the time the working one needs:
# measured in docs/performance.md. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
