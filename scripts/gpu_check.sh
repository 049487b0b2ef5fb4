#!/usr/bin/env bash
# Every GPU check and measurement normsweep needs, in one run on a CUDA machine, within a time budget:
#
#   bash scripts/gpu_check.sh [SECTION ...]      (default: info tests sweeps bench determinism compile suite)
#
#   info         nvidia-smi, torch, the card
#   tests        tests/test_cuda.py and tests/test_compile.py (the CUDA tests skip where there is no GPU)
#   sweeps       the default sweep with device=cuda, one job at a time and 4 at once (joblib), timed
#   bench        python -m normsweep.bench --device cuda, every norm, fp32 and bf16, deep_cnn and resnet20
#   determinism  scripts/cudnn_determinism.py: what deterministic cuDNN costs, and whether it is needed
#   compile      the benchmark again with --compile (deep_cnn, every norm, bf16 then fp32)
#   suite        the whole test suite with CUDA available (no SLURM cluster there: those tests skip)
#   packing      5 norms x 3 seeds on CIFAR-shaped synthetic images (50,000 train+val), resnet20 and deep_cnn:
#                one job at a time, 4 at once (joblib), and packed (pack=true); packed against alone per job
#                (scripts/compare_packed.py). Not in the default list (estimated 6-9 minutes on an H100/H200):
#                GPU_CHECK_SECONDS=560 bash scripts/gpu_check.sh info packing   (PACK_EPOCHS, PACK_MODELS, PACK_SIZE narrow it;
#                PACK_DEVICE=cpu tries it here)
#
# Results go to $OUT (the device tool's output folder) or ./gpu_results: every log and CSV in results.tar.gz, and
# each section's exit status and seconds in sections.txt, both rewritten after every section, so that a run stopped
# at its limit still brings back what it finished. GPU_CHECK_SECONDS (default 420) bounds the whole run; a section
# gets at most its cap (CAP_<section>=seconds changes it) and what is left. BENCH_STEPS, BENCH_REPEATS,
# COMPILE_NORMS and COMPILE_PRECISIONS narrow the benchmarks.
#
# A GPU machine without network and without hydra-core: make the wheels here first (pure Python, any version of
# Python 3), and carry .whl/ there; they are installed into /tmp/site:
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 hydra-core omegaconf hydra-joblib-launcher \
#       hydra-submitit-launcher submitit
set -u
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
export OUT=${OUT:-$PWD/gpu_results}
export R=${GPU_CHECK_WORK:-/tmp/gpu_check} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=python3
ms() { echo $(($(date +%s%N) / 1000000)); }
seconds() { local d=$(($(ms) - $1)); printf '%d.%03d' $((d / 1000)) $((d % 1000)); }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

left() { echo $((BUDGET - ($(date +%s) - START))); }

pack() { tar -czf "$OUT/results.tar.gz" -C "$R" . 2>/dev/null; }

# section NAME CAP: run_NAME in its own process for at most CAP seconds (or what is left), logged to r/NAME.log
section() {
    local name=$1 cap=$2 t s rc
    t=$(left)
    if ((t < 15)); then
        echo "$name skipped (no time left)" | tee -a "$OUT/sections.txt"
        return
    fi
    ((cap < t)) && t=$cap
    echo "== $name (at most ${t} s)"
    s=$(ms)
    timeout -k 5 "$t" bash "$SELF" --one "$name" >"$R/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$(seconds "$s") cap=$t" | tee -a "$OUT/sections.txt"
    tail -n 4 "$R/$name.log"
    pack
}

SWEEP=(-m norm=none,bn,ln,in,gn device=cuda)

run_info() {
    nvidia-smi
    $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
torch.cuda.device_count(), 'GPU(s)'); print('bf16', torch.cuda.is_bf16_supported())"
    $PY -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|triton|hydra|omegaconf|pandas|numpy|joblib) "
    nproc
}

run_tests() {
    $PY -m pytest tests/test_cuda.py tests/test_compile.py -o addopts="" -p no:cacheprovider -n 4 -ra --durations=0 -v
}

run_sweeps() {
    local s
    for launcher in basic joblib; do
        extra=()
        [[ $launcher == joblib ]] && extra=(hydra/launcher=joblib hydra.launcher.n_jobs=4)
        s=$(ms)
        $PY -m normsweep "${SWEEP[@]}" "${extra[@]}" "hydra.sweep.dir=$R/sweep_$launcher"
        echo "sweep $launcher: exit $?, $(seconds "$s") s wall"
    done
    for launcher in basic joblib; do cp "$R/sweep_$launcher/results.csv" "$R/results_$launcher.csv" 2>/dev/null; done
}

run_bench() {
    for model in deep_cnn resnet20; do
        for precision in fp32 bf16; do
            $PY -m normsweep.bench --device cuda --model "$model" --precision "$precision" --norm "$NORMS" \
                --steps "${BENCH_STEPS:-40}" --repeats "${BENCH_REPEATS:-3}" --out "$R/bench_${model}_${precision}.csv"
        done
    done
}

run_determinism() {
    $PY scripts/cudnn_determinism.py --out "$R/cudnn_determinism.csv"
}

run_compile() {
    for precision in ${COMPILE_PRECISIONS:-bf16 fp32}; do
        $PY -m normsweep.bench --device cuda --model deep_cnn --precision "$precision" --norm "${COMPILE_NORMS:-$NORMS}" \
            --compile --steps "${BENCH_STEPS:-40}" --repeats 2 --out "$R/bench_deep_cnn_${precision}_compiled.csv"
    done
}

run_packing() {
    local data=(dataset=synthetic "dataset.size=${PACK_SIZE:-62500}" "dataset.shape=[3,32,32]" "epochs=${PACK_EPOCHS:-2}"
        "device=${PACK_DEVICE:-cuda}")
    local model how s extra
    for model in ${PACK_MODELS:-resnet20 deep_cnn}; do
        for how in packed alone joblib4; do
            extra=(pack=false)
            [[ $how == packed ]] && extra=(pack=true)
            [[ $how == joblib4 ]] && extra=(pack=false hydra/launcher=joblib hydra.launcher.n_jobs=4)
            s=$(ms)
            $PY -m normsweep -m norm=none,bn,ln,in,gn seed=0,1,2 "model=$model" "${data[@]}" "${extra[@]}" \
                "hydra.sweep.dir=$R/pack_${model}_$how" >"$R/pack_${model}_$how.log" 2>&1
            echo "packing $model $how: exit $?, $(seconds "$s") s wall"
        done
        $PY scripts/compare_packed.py "$R/pack_${model}_alone" "$R/pack_${model}_packed"
    done
}

run_suite() {
    # -v: each result on its own line as it comes, so a run stopped at its cap still names its failures
    $PY -m pytest -o addopts="" -p no:cacheprovider -n 12 -ra -v --durations=15 -m "not slurm" \
        --ignore tests/test_install.py
}

if [[ ${1:-} == --one ]]; then  # one section, in its own process (run by `section` under timeout)
    NORMS=$($PY -c "from normsweep.config.schema import options; print(','.join(options('norm')))")
    "run_$2"
    exit
fi

rm -rf "$R"; mkdir -p "$R" "$OUT"
BUDGET=${GPU_CHECK_SECONDS:-420}
START=$(date +%s)
if ! $PY -c "import hydra, omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$R/install.log" 2>&1
fi
SECTIONS=("$@")
((${#SECTIONS[@]})) || SECTIONS=(info tests sweeps bench determinism compile suite)
declare -A CAP=([info]=30 [tests]=150 [sweeps]=120 [bench]=200 [determinism]=60 [compile]=200 [suite]=300 [packing]=520)
: >"$OUT/sections.txt"
for name in "${SECTIONS[@]}"; do
    cap_var=CAP_$name
    section "$name" "${!cap_var:-${CAP[$name]:-60}}"
done
echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/sections.txt"
pack
