#!/usr/bin/env bash
# One GPU-machine call: build, GPU tests, benchmarks, markdown table. Run from anywhere in the repo:
#
#   bash benchmarks/device_check.sh
#   BENCH_ARGS="-k adaln" bash benchmarks/device_check.sh           # extra pytest args for the benchmarks
#   OPENVID_GIT_COMMIT=abc1234 bash benchmarks/device_check.sh      # where the copy has no .git
#
# Environment:
#   OUT          output folder (default ./device_out): setup.log build.log env.txt gpu_tests.log
#                bench.log bench.json bench_table.md
#   BENCH_ARGS   extra args for the benchmark pytest (shell-quoted, e.g. BENCH_ARGS='-k "adaln and fwd"')
#   TEST_ARGS    extra args for the GPU-test pytest
#   SKIP_BUILD=1 / SKIP_TESTS=1 / SKIP_BENCH=1   leave a step out
#   PYTHON       interpreter (default: python, else python3)
#   OPENVID_BENCH_TIME etc.  harness knobs (see benchmarks/harness.py), e.g. OPENVID_BENCH_TIME=0.25
#
# Every step runs even if an earlier one failed; the exit status is non-zero if any step failed.
# The table is printed last, so it is at the end of the call's output.

set -uo pipefail   # no -e: a failing step is recorded and the next one still runs
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
if [ -z "$PY" ]; then echo "device_check: no python found" >&2; exit 1; fi

eval "bench_args=(${BENCH_ARGS:-})"
eval "test_args=(${TEST_ARGS:-})"

failed=()
step() { echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $* ==="; }

# Carried wheels (no network there).
if [ -f .device/setup.sh ]; then
    step "setup: .device/setup.sh"
    bash .device/setup.sh 2>&1 | tee "$OUT/setup.log" || failed+=("setup")
fi

# Build (verbose log to file only; its tail on failure).
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step "build: pip install -e . --no-build-isolation --no-deps -v  (log: $OUT/build.log)"
    if "$PY" -m pip install -e . --no-build-isolation --no-deps -v >"$OUT/build.log" 2>&1; then
        echo "build ok"
        grep -iE "warning|error" "$OUT/build.log" | grep -viE "^\s*(ignoring|Requirement)|-Wno-|werror" | tail -n 20 || true
    else
        failed+=("build")
        echo "BUILD FAILED; last lines of $OUT/build.log:"
        tail -n 60 "$OUT/build.log"
    fi
fi

# Environment.
step "environment -> $OUT/env.txt"
{
    echo "## date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "## git: $(git rev-parse --verify -q HEAD 2>/dev/null || echo "${OPENVID_GIT_COMMIT:-no git}")"
    echo "## nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1 || true
    echo "## nvcc"
    nvcc --version 2>&1 | tail -n 2 || echo "no nvcc on PATH"
    echo "## python"
    "$PY" - <<'PY' 2>&1
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", p.multi_processor_count, f"cc {p.major}.{p.minor}",
          f"mem {p.total_memory / 2**30:.1f} GiB", f"L2 {getattr(p, 'L2_cache_size', 0) / 1e6:.1f} MB")
for name in ("triton", "pytest", "pytest_benchmark", "flash_attn", "xformers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
try:
    import openvid_kernels as ok
    from openvid_kernels import backends
    print("openvid_kernels", getattr(ok, "__file__", None) or list(ok.__path__),
          "cuda extension built:", backends.cuda_extension_available())
except Exception as exc:
    print("openvid_kernels does not import:", type(exc).__name__, exc)
PY
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# GPU tests.
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    step "gpu tests: pytest -m gpu tests -q --maxfail=30  (log: $OUT/gpu_tests.log)"
    "$PY" -m pytest -m gpu tests -q --maxfail=30 -rs ${test_args[@]+"${test_args[@]}"} 2>&1 | tee "$OUT/gpu_tests.log"
    rc=$?
    if [ "$rc" = 5 ]; then
        echo "WARNING: no test matched -m gpu (pytest exit 5)"
    elif [ "$rc" != 0 ]; then
        failed+=("gpu-tests(rc=$rc)")
    fi
fi

# Benchmarks.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    step "benchmarks: pytest benchmarks ${BENCH_ARGS:-}  (log: $OUT/bench.log)"
    rm -f "$OUT/bench.json"
    "$PY" -m pytest benchmarks -q -rs -p no:cacheprovider \
        --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,min,max,rounds,iterations \
        ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$OUT/bench.log"
    rc=$?
    [ "$rc" = 0 ] || failed+=("benchmarks(rc=$rc)")

    step "report -> $OUT/bench_table.md"
    if "$PY" benchmarks/report.py "$OUT/bench.json" >"$OUT/bench_table.md"; then
        echo
        cat "$OUT/bench_table.md"
    else
        failed+=("report")
    fi
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "device_check: FAILED steps: ${failed[*]}  (${SECONDS}s)"
    exit 1
fi
echo "device_check: all steps passed (${SECONDS}s)"
