#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with an NVIDIA GPU, a CUDA build of torch, nvcc and
# no network. From the repository root:   OUT=/some/dir scripts/gpu_check.sh
# It builds the package with its CUDA extension, runs the GPU tests (CUDA, then Triton), times
# gae per backend, checks the CUDA kernels' memory accesses under compute-sanitizer and runs the
# benchmarks. $OUT/gpu_report.txt gets the summary table and the short logs; the long logs go
# beside it ($OUT/<step>.log, at most 5 files). Each step has a time limit, the whole run stays
# under 8.5 minutes, and a failed step does not stop the others. Exit status 0 means the build
# and the CUDA tests passed (with no test skipped).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
REPORT=$OUT/gpu_report.txt
LOGS=$(mktemp -d)
START=$(date +%s)
DEADLINE=$((START + 500))
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RLHF_FAST_BUILD_CUDA=1
unset TRITON_INTERPRET RLHF_FAST_BACKEND

declare -a ROWS=()
STATUS=0

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, under the
# smaller of LIMIT_S and the time left, and records a row of the summary.
step() {
  local name=$1 limit=$2 left began rc
  shift 2
  left=$((DEADLINE - $(date +%s)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    ROWS+=("$(printf '%-14s %-9s %6s  %s' "$name" skipped - "out of time")")
    return 1
  fi
  began=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="rc=$rc"
  ROWS+=("$(printf '%-14s %-9s %5ss  %s' "$name" "$verdict" $(($(date +%s) - began)) "$name.log")")
  return "$rc"
}

build() {  # in place: the tests import rlhf_fast from this checkout
  "$PY" setup.py build_ext --inplace || return
  # setup.py installs kernels/ as rlhf_fast.kernels; an in-place build has no such mapping.
  ln -sfn ../kernels rlhf_fast/kernels
}

native_status() {
  "$PY" - <<'EOF'
import torch
from rlhf_fast import _native
from rlhf_fast.ops import backends
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", torch.cuda.get_device_name())
print("_C:", _native.cpp is not None, _native.cpp_error or "")
print("_cuda:", _native.cuda is not None, _native.cuda_error or "")
for op, per_backend in backends("cuda").items():
    print(op, {name: status.available for name, status in per_backend.items()})
raise SystemExit(0 if _native.cuda is not None else 1)
EOF
}

cuda_tests() {  # the GPU tests of the CUDA kernels; a skipped one counts as a failure here
  "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$LOGS/cuda_tests.xml" \
    tests/test_cuda_kernels.py -k "test_cuda_gae or test_cuda_op" || return
  grep -q 'skipped="0"' "$LOGS/cuda_tests.xml" || { echo "some GPU tests were skipped"; return 2; }
}

ptxas_usage() {  # registers, spills and shared memory of each kernel, as built for sm_90
  local source
  for source in csrc/cuda/*.cu; do
    echo "== $source"
    nvcc -arch=sm_90 -O3 -I csrc -Xptxas -v -c "$source" -o /tmp/ptxas_sm90.o 2>&1 |
      grep -E "Compiling|Used|spill" | sed 's/ptxas info *: //'
  done
}

sanitize() {  # out-of-bounds and misaligned accesses of the CUDA kernels on a few shapes
  local tool
  tool=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [[ -n $tool ]] || { echo "compute-sanitizer not found"; return 3; }
  "$tool" --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cuda_kernels.py -k "test_cuda_gae_strided or test_cuda_gae_empty" &&
    "$tool" --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_quant_gpu_kernels.py -k "test_cuda_gemv_unaligned"
}

time_gae() {
  "$PY" - <<'EOF'
import torch
from rlhf_fast import ops

def microseconds(fn, repeats=20, rounds=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / repeats)
    return best

print(f"{'B x T':>12} {'dtype':>9} {'backend':>9} {'us':>10} {'GB/s':>8}")
for batch, steps in [(64, 1024), (64, 8192), (512, 2048), (8192, 2048)]:
    for dtype in (torch.float32, torch.bfloat16):
        rewards = torch.randn(batch, steps, device="cuda").to(dtype)
        values = torch.randn(batch, steps, device="cuda").to(dtype)
        lengths = torch.randint(steps // 2, steps + 1, (batch, 1), device="cuda")
        mask = torch.arange(steps, device="cuda")[None, :] < lengths
        moved = batch * steps * (2 * rewards.element_size() + 1 + 8)  # inputs + mask + outputs
        names = ["cuda", "triton"] + (["reference"] if batch * steps <= 2**16 else [])
        for name in names:
            try:
                us = microseconds(lambda: ops.gae(rewards, values, mask, backend=name),
                                  repeats=1 if name == "reference" else 20)
            except Exception as error:  # a backend missing here is reported, not fatal
                print(f"{batch:>5} x {steps:<5} {str(dtype)[6:]:>9} {name:>9} {type(error).__name__}")
                continue
            print(f"{batch:>5} x {steps:<5} {str(dtype)[6:]:>9} {name:>9} {us:10.1f} {moved / us / 1e3:8.1f}")
EOF
}

export PY LOGS
export -f build native_status cuda_tests ptxas_usage sanitize time_gae

{
  echo "rlhf-fast GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi -L 2>&1 | head -4
  nvcc --version 2>&1 | tail -2
} >"$REPORT"

step build 200 build || STATUS=1
step native 30 native_status || STATUS=1
step cuda_tests 90 cuda_tests || STATUS=1
step quant_gpu_tests 90 "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_quant_gpu_kernels.py
# Compiled Triton kernels, the CUDA ops through rlhf_fast.ops, the trainer with --device cuda.
step gpu_tests 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider -n 4 \
  tests/test_gpu_compiled.py || STATUS=1
step bench 170 "$PY" -m pytest -q -p no:cacheprovider -k cuda --benchmark-max-time=0.3 \
  --benchmark-columns=median,iqr,rounds bench/test_bench_gpu.py bench/test_bench_gae.py \
  bench/test_bench_rank_loss.py
step sanitizer 60 sanitize
step ptxas 30 ptxas_usage
step timing 40 time_gae

{
  echo
  printf '%-14s %-9s %6s  %s\n' step result time log
  printf '%s\n' "${ROWS[@]}"
  echo "total $(($(date +%s) - START))s, exit status $STATUS"
  for name in native ptxas timing; do
    [[ -s $LOGS/$name.log ]] && { echo; echo "== $name"; cat "$LOGS/$name.log"; }
  done
  for name in build cuda_tests quant_gpu_tests gpu_tests sanitizer; do
    [[ -s $LOGS/$name.log ]] || continue
    cp "$LOGS/$name.log" "$OUT/"
    echo; echo "== $name (last lines; all in $name.log)"; tail -n 25 "$LOGS/$name.log"
  done
  if [[ -s $LOGS/bench.log ]]; then  # the tables bench/conftest.py prints at the end
    cp "$LOGS/bench.log" "$OUT/"
    echo; echo "== benchmark tables"
    sed -n '/rlhf_fast: median time per call/,$p' "$LOGS/bench.log" | grep -v '^$'
  fi
} >>"$REPORT"
cat "$REPORT"
exit "$STATUS"
