"""normsweep's SLURM launcher plugin (Hydra registers launcher schemas found in the `hydra_plugins` namespace)."""
