#!/usr/bin/env bash
# The default sweep's wall time against the sum of its epochs (metrics.csv's epoch_seconds): what normsweep adds
# around the training (start-up, imports, each job's set-up, the aggregation, the exit). Prints one line per run.
# Usage: scripts/sweep_overhead.sh [RUNS] [extra overrides...]   (default: 3 runs of the README's quickstart)
set -euo pipefail
runs=${1:-3}
shift || true
python=${PYTHON:-python}
for _ in $(seq "$runs"); do
    sweep=$(mktemp -d)
    start=$(date +%s.%N)
    "$python" -m normsweep -m norm=none,bn,ln,in,gn "$@" hydra.sweep.dir="$sweep/sweep" > "$sweep/out.txt" 2>&1
    end=$(date +%s.%N)
    "$python" - "$sweep/sweep" "$start" "$end" <<'PY'
import glob, sys
import pandas as pd
folder, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
epochs = sum(pd.read_csv(f)["epoch_seconds"].sum() for f in glob.glob(f"{folder}/*/metrics.csv"))
print(f"wall {end - start:.2f} s, sum of epochs {epochs:.2f} s, ratio {(end - start) / epochs:.2f}")
PY
    rm -rf "$sweep"
done
