#!/usr/bin/env bash
# One command on a GPU machine: the GPU tests and every benchmark, in under 8 minutes,
# every table, JSON and plot written into OUT_DIR; a short summary table printed last.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Environment (all optional):
#   PYTHON=python3       the interpreter (needs torch with CUDA, triton, transformers)
#   WHEELS=.whl          a folder of wheels for what that python lacks (matplotlib,
#                        pytest-benchmark, hypothesis, compressed-tensors, gguf, ...; made by
#                        bench/fetch_wheels.sh): installed offline first, beside the system's
#   TP_DEADLINE=450      seconds for the whole run; a step gets min(its budget, time left)
#   TP_ONLY=qps,compress run only these steps (names in the summary table)
#   LLMC_PYTHON=PATH     a python with llmcompressor: compress speed is compared against it
# Each step runs under `timeout`; one that fails or runs out of time does not stop the rest.
# Logs: OUT_DIR/logs/STEP.log. Then bench/summarize.py writes OUT_DIR/SUMMARY.md.
set -u
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET            # real kernels on the GPU
START=$(date +%s)
DEADLINE=${TP_DEADLINE:-450}
PY=${PYTHON:-python3}
SUMMARY=()

# ---------------------------------------------------------------- wheels for what is missing
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # exactly these wheels (bench/fetch_wheels.sh lists their closure), in a folder put first
    # on PYTHONPATH: no venv module needed, the system's torch/triton/transformers stay
    SITE=${TMPDIR:-/tmp}/tritonpress-gpu-site
    echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl \
            > "$OUT/logs/wheels.log" 2>&1; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else
        echo "gpu_check: pip could not install the wheels (logs/wheels.log); going on without"
    fi
fi

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- the machine
"$PY" - > "$OUT/env.json" 2> "$OUT/logs/env.log" <<'EOF'
import datetime, importlib, json, platform, subprocess
import torch
v = {}
for m in ["torch", "triton", "transformers", "compressed_tensors", "matplotlib", "pytest",
          "pytest_benchmark", "hypothesis", "gguf", "llmcompressor"]:
    try:
        v[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception:
        v[m] = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    smi = None
print(json.dumps(dict(gpu=gpu, capability=list(torch.cuda.get_device_capability())
                      if gpu else None, cuda=torch.version.cuda, nvidia_smi=smi,
                      python=platform.python_version(), date=datetime.date.today().isoformat(),
                      versions=v), indent=1))
EOF
echo "gpu_check: $(tr -d '\n' < "$OUT/env.json" | tr -s ' ' | cut -c1-400)"
# TP_ALLOW_CPU=1: dry run of this script's plumbing on a CPU (the benches fall back to their
# reduced modes; nothing measured means anything)
if [ -z "${TP_ALLOW_CPU:-}" ] &&
        ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY; this script is for a GPU machine" >&2
    echo "(on a CPU: python bench/bench_qps.py OUT --cpu; bench_compress_speed.py OUT --small)" >&2
    exit 1
fi

# ---------------------------------------------------------------- steps
# step NAME BUDGET_S CMD...: run CMD with min(BUDGET, time left) seconds, log, record.
step() {
    local name=$1 budget=$2
    shift 2
    if [ -n "${TP_ONLY:-}" ] && [[ ",$TP_ONLY," != *",$name,"* ]]; then
        return
    fi
    local left=$((DEADLINE - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$(printf '%-10s %-22s %6s %6s  %s' "$name" "skipped (deadline)" - "$budget" -)")
        return
    fi
    local t=$((budget < left ? budget : left))
    echo "=== $name (${t} s): $*"
    local s0 rc status
    s0=$(date +%s)
    timeout -k 10 "$t" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT" ;;
        5) status="no tests ran" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    local took=$(($(date +%s) - s0))
    echo "    $status in ${took} s; last lines of logs/$name.log:"
    tail -n 4 "$OUT/logs/$name.log" | cut -c1-160 | sed 's/^/    | /'
    SUMMARY+=("$(printf '%-10s %-22s %6s %6s  %s' "$name" "$status" "$took" "$t" "logs/$name.log")")
}
skip() {   # NAME REASON
    if [ -n "${TP_ONLY:-}" ] && [[ ",$TP_ONLY," != *",$1,"* ]]; then
        return
    fi
    echo "=== $1: skipped ($2)"
    SUMMARY+=("$(printf '%-10s %-22s %6s %6s  %s' "$1" "skipped" - - "$2")")
}

# The issue's evidence first (QPS, compression speed), then the tests, then the other
# helpers' benchmarks, so a slow machine loses the least important steps to the deadline.
step qps 75 "$PY" bench/bench_qps.py "$OUT/qps" --budget 55

LLMC_ARGS=(--skip-llmc)
[ -n "${LLMC_PYTHON:-}" ] && LLMC_ARGS=(--llmc-python "$LLMC_PYTHON" --llmc-timeout 120)
step compress 110 "$PY" bench/bench_compress_speed.py "$OUT/compress" --budget 80 "${LLMC_ARGS[@]}"

if has pytest; then
    TIMEOUT_ARGS=()
    has pytest_timeout && TIMEOUT_ARGS=(--timeout 60)
    # the files whose code path differs on a GPU first (pytest drops the repeats)
    step tests 90 "$PY" -m pytest -q -p no:cacheprovider -rfE "${TIMEOUT_ARGS[@]}" \
        --junitxml "$OUT/tests.xml" --continue-on-collection-errors \
        tests/test_gemm.py tests/test_kernels_quant.py tests/test_kernels_hessian.py \
        tests/test_kernels_gptq_sweep.py tests/test_kernels_awq.py tests/test_kernels_sparse24.py \
        tests/test_runtime.py tests
    if has pytest_benchmark; then
        step kernels 40 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_kernels.py \
            --benchmark-json "$OUT/bench_kernels.json" --benchmark-columns=median,iqr,rounds \
            --benchmark-sort=name
    else
        skip kernels "pytest-benchmark not installed (carry its wheel)"
    fi
else
    skip tests "pytest not installed (carry its wheel)"
    skip kernels "pytest not installed"
fi

step gemm 55 "$PY" bench/bench_gemm.py "$OUT/gemm"
step quant 25 "$PY" bench/bench_quant_kernels.py
step sparsegpt 40 "$PY" bench/bench_sparsegpt_gpu.py "$OUT/sparsegpt" --skip-llmc
step gptq 40 "$PY" bench/bench_gptq_gpu.py --skip-e2e --out "$OUT/gptq"
step awq 45 "$PY" bench/bench_awq_gpu.py "$OUT/awq" --skip-llmc

# ---------------------------------------------------------------- verdicts and summary
"$PY" bench/summarize.py "$OUT" > "$OUT/logs/summarize.log" 2>&1 &&
    sed -n '/| claim |/,/^$/p' "$OUT/SUMMARY.md"
if [ -f "$OUT/tests.xml" ]; then
    "$PY" - "$OUT/tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print("tests: " + ", ".join(f"{k} {s.get(k)}" for k in ("tests", "failures", "errors", "skipped")))
EOF
fi
echo
echo "gpu_check summary ($(( $(date +%s) - START )) s of ${DEADLINE} s; outputs in $OUT)"
printf '%-10s %-22s %6s %6s  %s\n' step status took budget log
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
