"""A data set of your own for normsweep: a function that returns (images, labels)."""

import numpy as np


def stripes(n=1200, size=16, seed=0):
    """Noisy images of stripes at one of four angles; the label is the angle. Images uint8 (N, 1, H, W)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    y, x = np.mgrid[0:size, 0:size]
    angles = labels * np.pi / 4
    phase = rng.uniform(0, 2 * np.pi, n)
    waves = np.sin(0.8 * (np.cos(angles)[:, None, None] * x + np.sin(angles)[:, None, None] * y) + phase[:, None, None])
    images = 127.5 + 50 * waves + rng.normal(0, 60, (n, size, size))
    return np.clip(images, 0, 255).astype(np.uint8)[:, None], labels
