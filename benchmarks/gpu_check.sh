#!/usr/bin/env bash
# One-shot check on a lent GPU: install mome (building the CUDA extension), compile the Triton kernels,
# run the GPU tests, run a calibrated subset of the benchmarks, write at most 8 files to $OUT and print
# the summary table last. Every step has a time limit and a failing step does not stop the others.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--subset tiny|quick|full]
#                           [--skip-install] [--skip-tests] [--skip-bench] [--bench attention,decode,...]
#
# --bench picks benchmark families (attention, decode, modality, itc, layer; default all), so a kernel issue
# can spend its GPU minutes on its own ops.
#
# Files written: steps.log (each step, exit status, seconds), install.log (pip build, `mome info`, AOT
# compile for sm_90, run last), gpu-tests.log, bench.log, bench.json (every row, pytest-benchmark layout), bench.md
# (markdown table + summary), bench.png (plot with the roofline).
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DRY_RUN=0
SKIP_INSTALL=0
SKIP_TESTS=0
SKIP_BENCH=0
BUDGET="${MOME_GPU_CHECK_SECONDS:-480}"
SUBSET=quick
FAMILIES="attention decode modality itc layer"
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --skip-install) SKIP_INSTALL=1 ;;
        --skip-tests) SKIP_TESTS=1 ;;
        --skip-bench) SKIP_BENCH=1 ;;
        --out)
            case "${2:--}" in -*) echo "gpu_check: --out needs a directory" >&2; exit 2 ;; esac
            OUT_DIR="$2"; shift ;;
        --budget)
            [ $# -ge 2 ] || { echo "gpu_check: --budget needs seconds" >&2; exit 2; }
            case "$2" in ''|*[!0-9]*) echo "gpu_check: --budget takes whole seconds, got '$2'" >&2; exit 2 ;; esac
            BUDGET="$2"; shift ;;
        --subset)
            [ $# -ge 2 ] || { echo "gpu_check: --subset needs tiny, quick or full" >&2; exit 2; }
            case "$2" in tiny|quick|full) SUBSET="$2" ;; *) echo "gpu_check: --subset takes tiny, quick or full, got '$2'" >&2; exit 2 ;; esac
            shift ;;
        --bench)
            [ $# -ge 2 ] || { echo "gpu_check: --bench needs a comma-separated list of families" >&2; exit 2; }
            FAMILIES="${2//,/ }"
            for family in $FAMILIES; do
                case "$family" in attention|decode|modality|itc|layer) ;;
                    *) echo "gpu_check: --bench takes attention, decode, modality, itc, layer; got '$family'" >&2; exit 2 ;;
                esac
            done
            shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-python3}"
if [ -z "$OUT_DIR" ]; then
    DEVICE_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -c 'A-Za-z0-9\n' '-' | sed 's/-*$//')"
    OUT_DIR="benchmarks/results/$(date -u +%Y-%m-%d)-${DEVICE_NAME:-unknown-device}"
fi
WORK="${TMPDIR:-/tmp}/mome-gpu-check-$$"
ROWS="$WORK/rows.jsonl"
REPORT_RESERVE=30  # seconds kept back for the report at the end
BENCH_OPTIONS="-q -p no:cacheprovider --benchmark-disable --subset $SUBSET --budget-ms 50 --rows-jsonl $ROWS"
# TRITON_CACHE_AUTOTUNING: autotune once per kernel and shape, not once per pytest process.
# The lent GPUs are Hopper (sm_90): building only that arch halves the extension build.
export MOME_CHECK_IDS=0 MAX_JOBS="${MAX_JOBS:-16}" MOME_CUDA_ARCHS="${MOME_CUDA_ARCHS:-90}" TRITON_CACHE_AUTOTUNING=1
unset TRITON_INTERPRET
if [ -z "${MOME_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
    MOME_COMMIT="$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
    export MOME_COMMIT
fi

# name | longest it may take (s) | log file | command. When the budget runs short, each remaining step gets a
# share of what is left in proportion to its longest time, so every benchmark family still runs; steps
# marked optional (the AOT compile, which CI also runs) only get what the others leave.
STEPS=()
add_step() { STEPS+=("$1|$2|$3|$4|${5:-}"); }
add_step environment 20 steps.log "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PYTHON -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; $PYTHON -c 'import triton; print(\"triton\", triton.__version__)'"
if [ "$SKIP_INSTALL" = 0 ]; then
    add_step install 180 install.log "$PYTHON -m pip install --no-build-isolation --no-deps -e . || { grep -q externally-managed \"\$LOG\" && $PYTHON -m pip install --no-build-isolation --no-deps --break-system-packages -e .; }"
fi
add_step mome-info 20 install.log "$PYTHON -m mome info"
if [ "$SKIP_TESTS" = 0 ]; then
    add_step gpu-tests 150 gpu-tests.log "$PYTHON -m pytest tests -m gpu -q -p no:cacheprovider -rfE"
fi
if [ "$SKIP_BENCH" = 0 ]; then
    for family in $FAMILIES; do
        case "$family" in
            attention) add_step bench-attention 90 bench.log "$PYTHON -m pytest benchmarks/bench_attention.py $BENCH_OPTIONS" ;;
            decode) add_step bench-decode 25 bench.log "$PYTHON -m pytest benchmarks/bench_decode.py $BENCH_OPTIONS" ;;
            modality) add_step bench-modality 45 bench.log "$PYTHON -m pytest benchmarks/bench_modality.py $BENCH_OPTIONS" ;;
            itc) add_step bench-itc 40 bench.log "$PYTHON -m pytest benchmarks/bench_itc.py $BENCH_OPTIONS" ;;
            layer) add_step bench-layer 45 bench.log "$PYTHON -m pytest benchmarks/bench_layer.py $BENCH_OPTIONS" ;;
        esac
    done
fi
add_step aot-compile-sm90 45 install.log "$PYTHON -m mome.kernels.aot --arch 90" optional  # CI compiles sm_80 too
REPORT_COMMAND="$PYTHON benchmarks/report.py $ROWS --markdown $OUT_DIR/bench.md --png $OUT_DIR/bench.png --json-out $OUT_DIR/bench.json"

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check dry run: budget ${BUDGET}s, subset $SUBSET, results in $OUT_DIR"
    n=1
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit log command optional <<< "$step"
        printf '%2d. %-16s at most %4ss  -> %-14s %s%s\n' "$n" "$name" "$limit" "$log" "$command" "${optional:+  (optional)}"
        n=$((n + 1))
    done
    printf '%2d. %-16s at most %4ss  -> %-14s %s\n' "$n" report "$REPORT_RESERVE" "bench.*" "$REPORT_COMMAND"
    exit 0
fi

mkdir -p "$OUT_DIR" "$WORK" || { echo "gpu_check: cannot create $OUT_DIR or $WORK" >&2; exit 2; }
SUMMARY="$OUT_DIR/steps.log"
: > "$SUMMARY"
FAILED=0
echo "gpu_check: budget ${BUDGET}s, subset $SUBSET, results in $OUT_DIR" | tee -a "$SUMMARY"
index=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit log command optional <<< "$step"
    index=$((index + 1))
    LOG="$OUT_DIR/$log"
    left=$((BUDGET - SECONDS - REPORT_RESERVE))
    if [ -z "$optional" ]; then  # this step's share of what is left, by the longest times of the steps to come
        still=0
        for later in "${STEPS[@]:$((index - 1))}"; do
            IFS='|' read -r _ later_limit _ _ later_optional <<< "$later"
            [ -n "$later_optional" ] || still=$((still + later_limit))
        done
        share=$((left * limit / still))
        [ "$limit" -lt "$share" ] || limit="$share"
    fi
    [ "$limit" -lt "$left" ] || limit="$left"
    if [ "$limit" -lt 5 ]; then
        echo "SKIPPED  $name: out of time (${SECONDS}s used of ${BUDGET}s)" | tee -a "$SUMMARY"
        continue
    fi
    echo "===== $name (limit ${limit}s): $command" >> "$LOG"
    started=$SECONDS
    LOG="$LOG" timeout --kill-after=10 "$limit" bash -c "$command" >> "$LOG" 2>&1
    status=$?
    took=$((SECONDS - started))
    case "$status" in
        0) verdict="OK      " ;;
        124|137) verdict="TIMEOUT "; FAILED=$((FAILED + 1)) ;;
        *) verdict="FAILED  "; FAILED=$((FAILED + 1)) ;;
    esac
    echo "$verdict $name: exit $status after ${took}s (log: $log)" | tee -a "$SUMMARY"
    if [ "$status" != 0 ]; then
        tail -n 5 "$LOG" | sed 's/^/           | /' | tee -a "$SUMMARY"
    fi
done

if [ -s "$ROWS" ]; then
    timeout "$REPORT_RESERVE" bash -c "$REPORT_COMMAND" >> "$OUT_DIR/bench.log" 2>&1 \
        || { echo "FAILED   report (see bench.log)" | tee -a "$SUMMARY"; FAILED=$((FAILED + 1)); }
else
    echo "SKIPPED  report: no benchmark rows were written" | tee -a "$SUMMARY"
fi
echo "gpu_check: ${SECONDS}s in all, $FAILED step(s) failed or timed out; files in $OUT_DIR:" | tee -a "$SUMMARY"
ls "$OUT_DIR" | tee -a "$SUMMARY"
echo
if [ -s "$ROWS" ]; then
    echo "===== summary (fastest mome provider vs best baseline, same run; bench.md has every row)"
    timeout 30 "$PYTHON" benchmarks/report.py "$ROWS" --summary
fi
rm -rf "$WORK"
[ "$FAILED" = 0 ]
