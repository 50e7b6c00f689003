#!/usr/bin/env bash
# GRPO over several GPU nodes: one process per node, joined by jax.distributed. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_nodes.sh --hosts=HOST0,HOST1,... [options] -- grpo_jax.main flags

Starts `python -m grpo_jax.main <flags after -->` once per node with
JAX_COORDINATOR_ADDRESS=HOST0:PORT, JAX_NUM_PROCESSES=<number of hosts> and
JAX_PROCESS_ID=<index of the host>; each process uses every GPU of its node. By default it
reaches the nodes by ssh and then follows HOST0's log; under a scheduler that starts one
task per node (srun, mpirun), run it on each node with --process-id instead.

The checkout and its environment must sit at the same path on every node, and --workdir must
be a directory all nodes share (NFS, Lustre): process 0 writes the metrics, all processes
write their parts of each checkpoint.

options:
  --hosts=H0,H1,...   the nodes, HOST0 first (required)
  --port=PORT         coordinator port on HOST0 (default 8476)
  --process-id=I      start only process I, here, in the foreground (no ssh)
  --repo=DIR          the checkout on every node (default: this one's path)
  --python=PATH       python of the environment with grpo_jax and jax[cuda12]
                      (default: DIR/.venv/bin/python)
  --log=PATH          each node's log file when started by ssh (default /tmp/grpo_jax.log)
  --no-follow         return once the processes have started
  --dry-run           print the commands, run nothing
  -h, --help          this text

example (2 nodes of 8 H100s, Qwen2.5-7B; FSDP inside each node, data parallel across):
  launch/gpu_nodes.sh --hosts=gpu0,gpu1 -- \
      --config=configs/gpu.py:7b,model=/shared/qwen2.5-7b,data=/shared/train.jsonl \
      --config.mesh.shape='(2,8,1)' --workdir=/shared/runs/grpo
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOSTS="" PORT=8476 PROCESS_ID="" REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="" LOG=/tmp/grpo_jax.log FOLLOW=1 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts=*) HOSTS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --process-id=*) PROCESS_ID="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --log=*) LOG="${1#*=}" ;;
    --no-follow) FOLLOW=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
TRAIN_FLAGS=("$@")
IFS=, read -r -a HOST_LIST <<< "$HOSTS"
[[ ${#HOST_LIST[@]} -gt 0 ]] || die "--hosts is required, e.g. --hosts=gpu0,gpu1"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port=$PORT is not a port number"
[[ ${#TRAIN_FLAGS[@]} -gt 0 ]] || die "grpo_jax.main flags are required after --, e.g. -- --config=configs/gpu.py:model=DIR,data=FILE --workdir=DIR"
if [[ -n "$PROCESS_ID" ]] && ! [[ "$PROCESS_ID" =~ ^[0-9]+$ && "$PROCESS_ID" -lt ${#HOST_LIST[@]} ]]; then
  die "--process-id=$PROCESS_ID is not allowed: 0 <= process id < ${#HOST_LIST[@]} (the number of hosts)"
fi
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
JAX_ENV=("JAX_COORDINATOR_ADDRESS=${HOST_LIST[0]}:$PORT" "JAX_NUM_PROCESSES=${#HOST_LIST[@]}")
TRAIN=("$PYTHON" -m grpo_jax.main "${TRAIN_FLAGS[@]}")

if [[ -n "$PROCESS_ID" ]]; then
  run env "${JAX_ENV[@]}" "JAX_PROCESS_ID=$PROCESS_ID" "${TRAIN[@]}"
  exit 0
fi
for i in "${!HOST_LIST[@]}"; do
  remote="cd $(show "$REPO") && $(show "${JAX_ENV[@]}" "JAX_PROCESS_ID=$i") setsid nohup"
  remote+=" $(show "${TRAIN[@]}") > $(show "$LOG") 2>&1 < /dev/null &"
  run ssh "${HOST_LIST[$i]}" "$remote"
done
if [[ "$FOLLOW" == 1 ]]; then
  run ssh "${HOST_LIST[0]}" "tail -n +1 -F $(show "$LOG")"
fi
