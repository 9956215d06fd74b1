#!/usr/bin/env bash
# Single-node launcher: run a Python module (or script) as N local ranks under torchrun.
#
#   launch/local.sh -m nat_megatron.train --config examples/configs/qwen3-8b.yaml [key=value ...]
#   NPROC_PER_NODE=2 launch/local.sh -m nat_megatron.train --config examples/configs/smollm2-135m-cpu.yaml train.steps=2
#
# The arguments are what would follow `python`; the launcher adds nothing to them. It runs in the
# repository root, so relative paths (configs, --out) are relative to it.
# Environment (all optional):
#   NPROC_PER_NODE  ranks to start (default: the GPUs nvidia-smi lists; 2 on a machine without
#                   GPUs, the size the CPU example configs expect)
#   NAT_PYTHON      interpreter (default: .venv/bin/python of this checkout if present, else python3)
#   RUN_DIR         where this run's logs go (default: runs/local/<UTC time>-<pid>)
# Logs: RUN_DIR/launch.log (the console, all ranks) and torchrun's per-rank files under RUN_DIR/ranks.
# On CPU the ranks use gloo, on GPU NCCL: the Python side chooses, not this script.
set -euo pipefail

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

NAT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${NAT_PYTHON:-} ]]; then
    if [[ -x $NAT_ROOT/.venv/bin/python ]]; then NAT_PYTHON=$NAT_ROOT/.venv/bin/python; else NAT_PYTHON=python3; fi
fi

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ $NPROC_PER_NODE -eq 0 ]]; then NPROC_PER_NODE=2; fi
fi

: "${RUN_DIR:=$NAT_ROOT/runs/local/$(date -u +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$RUN_DIR"
# Megatron needs one CUDA work queue so that communication kernels keep their issue order.
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
# Every rank gets its share of the cores (torchrun alone gives each one thread); on CPU the
# rank's trainer and its rollout engine both use them.
: "${OMP_NUM_THREADS:=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
export OMP_NUM_THREADS
: "${PYTHONUNBUFFERED:=1}"
export CUDA_DEVICE_MAX_CONNECTIONS PYTHONUNBUFFERED

cd "$NAT_ROOT"
{
    echo "# $(date -u +%FT%TZ) on $(hostname): $NPROC_PER_NODE ranks"
    echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    printf '%q ' "$NAT_PYTHON" "$@"
    echo
} > "$RUN_DIR/command.txt"
echo "launch/local.sh: $NPROC_PER_NODE ranks, logs in $RUN_DIR" >&2

# --standalone: a private c10d rendezvous on a free local port, so runs never collide.
set +e
"$NAT_PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
    --log-dir "$RUN_DIR/ranks" --tee 3 "$@" 2>&1 | tee "$RUN_DIR/launch.log"
rc=${PIPESTATUS[0]}
set -e
echo "$rc" > "$RUN_DIR/exit_code"
exit "$rc"
