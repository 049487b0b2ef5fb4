"""The jobs of a packed sweep against the same jobs of a sweep run one at a time (scripts/gpu_check.sh's `packing`):
per job, the largest relative difference of its losses over its epochs, its final validation accuracy in each, and
its training images per second in each. Usage: python scripts/compare_packed.py ALONE_SWEEP PACKED_SWEEP"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def jobs(sweep: Path) -> dict[tuple[str, ...], Path]:
    """Each job folder of a sweep, by its overrides less `pack` (the same job in both sweeps)."""
    found = {}
    for summary in sweep.glob("*/summary.json"):
        overrides = json.loads(summary.read_text()).get("overrides", [])
        found[tuple(sorted(o for o in overrides if not o.startswith("pack=")))] = summary.parent
    return found


def main(alone_dir: str, packed_dir: str) -> None:
    alone, packed = jobs(Path(alone_dir)), jobs(Path(packed_dir))
    rows = []
    for key in sorted(set(alone) & set(packed)):
        a, p = (pd.read_csv(d / "metrics.csv") for d in (alone[key], packed[key]))
        n = min(len(a), len(p))
        rel = max(
            ((a[c][:n] - p[c][:n]).abs() / a[c][:n].abs().clip(lower=1e-12)).max() for c in ("train_loss", "val_loss")
        )
        rows.append(
            {
                "job": " ".join(key),
                "epochs": f"{len(a)}/{len(p)}",
                "max_rel_loss_diff": rel,
                "val_acc_alone": a["val_acc"].iloc[-1],
                "val_acc_packed": p["val_acc"].iloc[-1],
                "img_s_alone": a["images_per_second"].median(),
                "img_s_packed_member": p["images_per_second"].median(),
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(table):
        print(
            f"median images/s per job: alone {table['img_s_alone'].median():.0f}, packed member "
            f"{table['img_s_packed_member'].median():.0f}; largest relative loss difference "
            f"{table['max_rel_loss_diff'].max():.3g}"
        )
    table.to_csv(Path(packed_dir).parent / f"{Path(packed_dir).name}_vs_alone.csv", index=False)


if __name__ == "__main__":
    main(*sys.argv[1:3])
