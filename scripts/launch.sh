#!/usr/bin/env bash
# Starts N local processes of a command for data-parallel training, with the variables torchrun sets (RANK,
# WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). When one process fails, the others are
# stopped and the launcher exits with the failed one's status.
#
#   scripts/launch.sh --nproc 2 -- ./build/omnilite train --config configs/small.json --out runs/small-dp
#
# Options:
#   --nproc N          processes on this machine (default 2)
#   --master-addr A    rendezvous host (default 127.0.0.1; rank 0 serves the store there)
#   --master-port P    rendezvous port (default $MASTER_PORT or 29500)
#   --nnodes K --node-rank I
#                      several machines: run the launcher on each with the same --master-addr (node 0's address);
#                      node I's processes take ranks I*N ... I*N+N-1 of K*N
# Multi-node jobs under torchrun or Slurm need no launcher: see docs/distributed.md.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

nproc=2 addr=127.0.0.1 port=${MASTER_PORT:-29500} nnodes=1 node_rank=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    --master-addr) addr=$2; shift 2 ;;
    --master-port) port=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option '$1'; the command follows '--' (see --help)" >&2; exit 2 ;;
  esac
done
for v in nproc port nnodes node_rank; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "launch.sh: --${v//_/-} '${!v}' is not a number" >&2; exit 2; }
done
(( nproc >= 1 )) || { echo "launch.sh: --nproc must be at least 1" >&2; exit 2; }
(( node_rank < nnodes )) || { echo "launch.sh: --node-rank $node_rank is not below --nnodes $nnodes" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "launch.sh: no command; usage: launch.sh --nproc N -- COMMAND [ARGS...]" >&2; exit 2; }

world=$((nproc * nnodes))
pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < nproc; i++)); do
  RANK=$((node_rank * nproc + i)) WORLD_SIZE=$world LOCAL_RANK=$i LOCAL_WORLD_SIZE=$nproc \
    MASTER_ADDR=$addr MASTER_PORT=$port "$@" &
  pids+=($!)
done

# Wait for every process; the first failure stops the rest.
status=0
remaining=${#pids[@]}
while (( remaining > 0 )); do
  set +e
  wait -n
  rc=$?
  set -e
  remaining=$((remaining - 1))
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "launch.sh: a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
exit $status
