#!/usr/bin/env bash
# The first check of the GPU code paths, on a machine with NVIDIA GPUs (none was ever lent to this project).
#
#   bash scripts/gpu_check.sh [REPORT]      (or: make gpu-check)
#
# Runs, and writes one line per step to REPORT (default gpu_check_report.txt), the details to REPORT.log:
#   1. every test marked gpu (pytest -m gpu)
#   2. the demo on 1 GPU with fp16, and on every GPU with bf16 and SyncBatchNorm (launch local --gpus N)
#   3. a run killed with kill -9 and restarted (--max-restarts 1) with run.deterministic=true, compared
#      bitwise with an uninterrupted one
#   4. the step-time benchmark on CUDA (ours against the hand-written loop)
# in under 8 minutes. On a machine without a CUDA GPU it says so, writes that to REPORT, and exits 0.
# Exit code: 0 when every step passed (or there is no GPU), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
REPORT=$(realpath -m "${1:-gpu_check_report.txt}")
LOG="$REPORT.log"
: >"$REPORT"
: >"$LOG"

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>>"$LOG" || echo 0)
if [ "${GPUS:-0}" = "0" ]; then
    echo "gpu_check: no CUDA GPU on this machine (torch.cuda.device_count() is 0): nothing to check" | tee "$REPORT"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "gpu_check $(date -Iseconds) on $(hostname): $GPUS GPU(s)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); [print(' ', i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} >>"$REPORT" 2>&1
failed=0

step() {  # step NAME COMMAND...: run it, one line PASS/FAIL in the report, its output in the log
    local name=$1 start status
    shift
    start=$(date +%s)
    echo "===== $name: $*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then status=PASS; else status=FAIL; failed=1; fi
    echo "$status  $name ($(($(date +%s) - start)) s)" | tee -a "$REPORT"
}

launch() { "$PY" -m launcher "$@"; }

step "tests marked gpu" "$PY" -m pytest -m gpu -q -p no:cacheprovider
step "demo, 1 GPU, fp16" launch local --gpus 1 configs/demo.yaml "run.dir=$WORK" run.name=fp16 \
    train.precision=fp16 train.epochs=3 train.progress_bar=false
step "demo, $GPUS GPU(s), bf16, sync_bn" launch local --gpus "$GPUS" configs/demo.yaml "run.dir=$WORK" \
    run.name=bf16 train.precision=bf16 train.sync_bn=true train.epochs=3 train.progress_bar=false

# A kill -9 of rank 0 mid-run, restarted by the agent, against an uninterrupted run: bitwise equal.
cat >"$WORK/resume.yaml" <<EOF
job: {name: tests.support.job:TestJob, samples: 512, marker_dir: $WORK/markers,
      faults: [{kind: kill, rank: 0, at: 11}]}
run: {dir: $WORK, deterministic: true}
data: {batch_size: 16, num_workers: 2}
train: {epochs: 2, progress_bar: false, stop_check_s: 0}
checkpoint: {every_steps: 5}
EOF
mkdir -p "$WORK/markers"
compare() {
    "$PY" - "$WORK/clean/checkpoints/last.pt" "$WORK/killed/checkpoints/last.pt" <<'PY'
import sys, torch
a, b = (torch.load(p, weights_only=True)["model"] for p in sys.argv[1:3])
different = [k for k in a if not torch.equal(a[k], b[k])]
print("bitwise equal" if not different else f"differ in {different}")
sys.exit(1 if different else 0)
PY
}
step "uninterrupted run" launch local --gpus "$GPUS" "$WORK/resume.yaml" run.name=clean "job.faults=[]"
step "run killed with -9 and restarted" launch local --gpus "$GPUS" --max-restarts 1 "$WORK/resume.yaml" run.name=killed
step "killed run ends bitwise equal" compare
step "step time on CUDA (bench)" env BENCH_DEVICE=cuda BENCH_ROUNDS=2 "$PY" -m bench step_time

echo "report: $REPORT (details: $LOG)"
exit $failed
