#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call that fits a machine lent for minutes:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]
#
# Runs from the repository root with the machine's python3 (or $PY) and torch; pnnh is taken
# from src/ (PYTHONPATH). A machine without registry access gets the pure-Python packages it
# lacks (pyhessian, mnist1d) as wheels in .whl/, unpacked into a temporary directory. In order
# of priority, each step under its own time limit and all of them under SECONDS (default 420):
#   1. the machine: GPU, driver, torch, CUDA; then tests/test_cuda.py (skipped without a GPU);
#   2. benchmarks/hessian_vs_pyhessian.py --device cuda: the CPU table's script and settings;
#   3. benchmarks/parity.py --device cuda: PNNH against the ResNet of the same depth, all configs;
#   4. the training paths that run only on CUDA: bf16 autocast with the GradScaler (--amp) and
#      --channels-last, torch.compile, a torchrun job on the GPU, then its --resume (with one
#      GPU the job has one rank, so nccl and --sync-bn, which need two GPUs, are not reached);
#   5. a Hessian probe of the trained checkpoint on cuda;
#   6. the default test suite under this machine's torch (pytest-xdist if present): CPU
#      behaviour, since tests/conftest.py hides the GPU from the tests.
# After every step its log and results are packed into OUT_DIR/results.tgz (atomically), and
# OUT_DIR/summary.txt gets one line per step (name, exit code, seconds), so a step that fails
# or overruns loses nothing of the steps before it. DEVICE=cpu QUICK=1 runs the same steps at
# smoke size on a machine without a GPU (a check of this script, not a measurement);
# ONLY="hessian parity" runs the named steps alone; SKIP_TESTS=1 leaves the test suite out.
set -u
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]}
BUDGET=${2:-420}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
Q=${QUICK:+--quick}
R=$(mktemp -d /tmp/pnnh-gpu.XXXX)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$R/site" .whl/*.whl
    PYTHONPATH="$R/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PNNH_CACHE_DIR="$R/cache"
START=$(date +%s)
: >"$OUT_DIR/summary.txt"

pack() {
    tar czf "$OUT_DIR/results.tgz.tmp" -C "$R" --exclude cache --exclude site --exclude '*.pt' . \
        && mv "$OUT_DIR/results.tgz.tmp" "$OUT_DIR/results.tgz"
}

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds, never past the budget
step() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    left=$((BUDGET - ($(date +%s) - START) - 5))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "$name skipped (budget spent)" | tee -a "$OUT_DIR/summary.txt"
        return
    fi
    echo "=== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$R/$name.log" 2>&1
    rc=$?
    tail -n 40 "$R/$name.log"
    echo "$name rc=$rc ${limit}s-limit $(($(date +%s) - t0))s" | tee -a "$OUT_DIR/summary.txt"
    pack
}

step machine 30 bash -c "nvidia-smi; $PY -c 'import torch, platform; print(platform.python_version(), torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)'"

# tests/test_cuda.py: bf16 autocast really runs under --amp; the Hessian matches float64 with TF32 on
step cuda_tests 90 env PNNH_TEST_CUDA=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py

step hessian 200 "$PY" benchmarks/hessian_vs_pyhessian.py --device "$DEVICE" $Q --out "$R/hessian" \
    --figure "$R/hessian/hessian_time_vs_error_cuda.png"

step parity 90 "$PY" benchmarks/parity.py --device "$DEVICE" $Q --threads 1 --repeats 11 --inner 5 \
    --configs cifar20 cifar56 cifar110 mlp100 cnn1d100 vit12 --name parity_cuda --out "$R/parity"

# PNNH_QUICK=1: train runs 1 epoch of 2 steps, probes use 64 samples (pnnh.cli.apply_quick)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m pnnh train)
SYN=(--model pnnh20 --dataset synthetic --dataset-arg 'input_shape=[3,32,32]' --batch-size 128
     --optimizer sgd --lr 0.05 --device "$DEVICE")
step train_fp32 45 env ${QUICK:+PNNH_QUICK=1} "$PY" -m pnnh train "${SYN[@]}" --epochs 4 --out "$R/runs/fp32"
step train_amp 45 env ${QUICK:+PNNH_QUICK=1} "$PY" -m pnnh train "${SYN[@]}" --epochs 4 --amp \
    --channels-last --out "$R/runs/amp"
step train_compile 90 env ${QUICK:+PNNH_QUICK=1} "$PY" -m pnnh train --model pnnh_mlp --depth 20 \
    --epochs 2 --device "$DEVICE" --compile --out "$R/runs/compile"
step torchrun 60 env ${QUICK:+PNNH_QUICK=1} "${TORCHRUN[@]}" "${SYN[@]}" --epochs 4 --checkpoint-steps 5 --out "$R/runs/ddp"
step torchrun_resume 60 env ${QUICK:+PNNH_QUICK=1} "${TORCHRUN[@]}" "${SYN[@]}" --epochs 6 --checkpoint-steps 5 --resume --out "$R/runs/ddp"
step probe 45 env ${QUICK:+PNNH_QUICK=1} "$PY" -m pnnh probe hessian \
    --checkpoint "$R/runs/amp/checkpoints/best.pt" --device "$DEVICE" --out "$R/runs/probe"

XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
[ -n "${QUICK:-}" ] && TESTS=(tests/test_hessian.py) || TESTS=()
# shellcheck disable=SC2086
[ -n "${SKIP_TESTS:-}" ] || step tests 240 "$PY" -m pytest -q --tb=line -p no:cacheprovider $XDIST "${TESTS[@]}"

echo "=== summary ($(($(date +%s) - START))s)"
cat "$OUT_DIR/summary.txt"
