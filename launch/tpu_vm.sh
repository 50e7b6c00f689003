#!/usr/bin/env bash
# GRPO on a Cloud TPU VM slice: create it, install this checkout on every worker, train on
# all workers at once, follow the logs, delete it. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [options] [-- grpo_jax.main flags]

commands:
  create   gcloud compute tpus tpu-vm create (--type, --version, --spot)
  install  ship this checkout's HEAD (git archive) to every worker, make a venv there and
           pip install it with jax[tpu]; --nfs=SERVER:/EXPORT also mounts a shared
           directory at /mnt/shared on every worker (multi-host runs need a shared workdir)
  run      start `python -m grpo_jax.main <flags after -->` on all workers (--worker=all)
           in the background, then follow worker 0's log (--no-follow: do not)
  logs     follow a worker's log (--worker=N, default 0)
  delete   delete the TPU VM

options:
  --name=NAME          TPU VM name (required)
  --zone=ZONE          e.g. us-central2-b for v4, us-west4-a for v5e (required)
  --project=PROJECT    gcloud project (default: gcloud's)
  --type=TYPE          accelerator type for create (default v4-8; e.g. v4-32, v5litepod-8)
  --version=VERSION    TPU software version for create (default tpu-ubuntu2204-base)
  --spot               create a spot VM
  --nfs=SERVER:/EXPORT install: mount this NFS export (e.g. Filestore) at /mnt/shared
  --port=PORT          jax.distributed coordinator port on worker 0 (default 8476)
  --worker=N           logs: which worker (default 0)
  --no-follow          run: return once the workers have started
  --dry-run            print the commands, run nothing (gcloud is not needed)
  -h, --help           this text

Processes find each other through jax.distributed: `run` sets JAX_COORDINATOR_ADDRESS to
worker 0's internal address; jax reads the process count and ids from the TPU metadata.

example (v4-8, Qwen2.5-1.5B in bfloat16 with FSDP):
  launch/tpu_vm.sh create  --name=grpo --zone=us-central2-b --type=v4-8
  launch/tpu_vm.sh install --name=grpo --zone=us-central2-b
  launch/tpu_vm.sh run     --name=grpo --zone=us-central2-b -- \
      --config=configs/tpu_v4.py:model=/home/me/qwen2.5-1.5b,data=/home/me/train.jsonl \
      --workdir=/home/me/runs/grpo
  launch/tpu_vm.sh delete  --name=grpo --zone=us-central2-b
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

COMMAND="${1:-}"
case "$COMMAND" in
  -h | --help) usage; exit 0 ;;
  create | install | run | logs | delete) shift ;;
  "") die "a command is required (create | install | run | logs | delete)" ;;
  *) die "unknown command '$COMMAND' (create | install | run | logs | delete)" ;;
esac

NAME="" ZONE="" PROJECT="" TYPE="v4-8" VERSION="tpu-ubuntu2204-base" SPOT=0 NFS="" PORT=8476
WORKER=0 FOLLOW=1 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --nfs=*) NFS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --no-follow) FOLLOW=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done
TRAIN_FLAGS=("$@")
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port=$PORT is not a port number"
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "--worker=$WORKER is not a worker number"
if [[ "$COMMAND" == run && ${#TRAIN_FLAGS[@]} -eq 0 ]]; then
  die "run needs grpo_jax.main flags after --, e.g. -- --config=configs/tpu_v4.py:model=DIR,data=FILE --workdir=DIR"
fi

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_FLAGS+=("--project=$PROJECT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/grpo_jax-$NAME.tar.gz"
LOG='~/grpo_jax.log'  # on each worker

case "$COMMAND" in
  create)
    spot=()
    [[ "$SPOT" == 0 ]] || spot=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
      "--accelerator-type=$TYPE" "--version=$VERSION" "${spot[@]}"
    ;;
  install)
    setup='set -e; rm -rf ~/grpo_jax && mkdir ~/grpo_jax && tar -xzf ~/grpo_jax.tar.gz -C ~/grpo_jax'
    setup+=' && python3 -m venv ~/grpo_venv && ~/grpo_venv/bin/pip install -q -U pip'
    setup+=' && ~/grpo_venv/bin/pip install -q -e "$HOME/grpo_jax[tpu]"'
    if [[ -n "$NFS" ]]; then
      setup+=" && sudo apt-get install -y -q nfs-common && sudo mkdir -p /mnt/shared"
      setup+=" && (mountpoint -q /mnt/shared || sudo mount -t nfs $(quote "$NFS") /mnt/shared)"
    fi
    run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:grpo_jax.tar.gz" --worker=all \
      "${GCLOUD_FLAGS[@]}"
    run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
      "--command=$setup"
    ;;
  run)
    describe=(gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_FLAGS[@]}"
              '--format=value(networkEndpoints[0].ipAddress)')
    show "${describe[@]}"
    coordinator="WORKER0_IP"
    [[ "$DRY_RUN" == 1 ]] || coordinator="$("${describe[@]}")"
    remote="cd ~/grpo_jax && JAX_COORDINATOR_ADDRESS=$coordinator:$PORT setsid nohup"
    remote+=" ~/grpo_venv/bin/python -m grpo_jax.main $(show "${TRAIN_FLAGS[@]}")"
    remote+=" > $LOG 2>&1 < /dev/null &"
    run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
      "--command=$remote"
    if [[ "$FOLLOW" == 1 ]]; then
      run gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${GCLOUD_FLAGS[@]}" \
        "--command=tail -n +1 -F $LOG"
    fi
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$NAME" "--worker=$WORKER" "${GCLOUD_FLAGS[@]}" \
      "--command=tail -n +1 -F $LOG"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
    ;;
esac
