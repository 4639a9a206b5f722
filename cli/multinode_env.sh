#!/usr/bin/env bash
# The paper's 700M shape (configs/moda_700m.yaml) with FSDP on several plain nodes (no SLURM):
# run this script on every node, with the same MASTER_ADDR, MASTER_PORT and NNODES and each
# node's own NODE_RANK (0 on the node at MASTER_ADDR). Lightning starts GPUS_PER_NODE processes
# per node itself and meets the other nodes at MASTER_ADDR:MASTER_PORT.
# Time: as cli/multinode_slurm.sbatch (20000 steps, about 2 h on 8 H100s per node plus the
# inter-node communication: an estimate, not a measured run).
#
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 NNODES=2 DATA='corpus/*.jsonl' bash cli/multinode_env.sh   # on 10.0.0.1
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 NNODES=2 DATA='corpus/*.jsonl' bash cli/multinode_env.sh   # on the other node
#
# MASTER_ADDR, NODE_RANK, NNODES, DATA: required. MASTER_PORT: default 29500 (a free TCP port on
# the main node). GPUS_PER_NODE: default 8. CACHE_DIR: tokenizer and token cache (default
# .cache/moda). Extra arguments go to `moda fit`. MODA is the command to call (default `moda`).
set -euo pipefail

# need VAR "what to set it to": stop with one line saying so when VAR is empty.
need() {
    if [[ -z "${!1:-}" ]]; then
        echo "$(basename "$0"): set $1 to $2" >&2
        exit 2
    fi
}

MODA=${MODA:-moda}
need MASTER_ADDR "the address of the node with NODE_RANK=0, the same on every node"
need NODE_RANK "the index of this node, 0 to NNODES-1 (0 on the MASTER_ADDR node)"
need NNODES "the number of nodes, the same on every node"
need DATA "the training files, a path or glob, e.g. DATA='corpus/*.jsonl'"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CACHE_DIR=${CACHE_DIR:-.cache/moda}
CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)
# Lightning's default cluster environment reads these three; without MASTER_PORT each node
# would pick a free port of its own and never meet the others.
export MASTER_ADDR MASTER_PORT NODE_RANK

# $MODA unquoted: it may be a command with arguments.
$MODA fit --config "$CONFIGS/moda_700m.yaml" \
    --trainer.strategy=fsdp --trainer.devices="$GPUS_PER_NODE" --trainer.num_nodes="$NNODES" \
    --data.files="$DATA" --data.cache_dir="$CACHE_DIR" \
    "$@"
