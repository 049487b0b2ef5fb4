"""normsweep: Hydra sweeps that compare normalization layers on image classifiers."""

__version__ = "0.1.0"
