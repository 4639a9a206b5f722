#!/usr/bin/env bash
# The paper's 700M shape (configs/moda_700m.yaml: width 1024, 36 layers, 16 query / 8 KV heads,
# T=4096, MoDA with FFN K/V) on one node of 8 GPUs with FSDP, on your own corpus.
# Time: 20000 steps of 8 x 4 x 4096 tokens (2.6B tokens); one H100 steps 4 x 4096 tokens of this
# model in about 0.3 s (docs/scaling.md), so about 2 h on 8 H100s plus FSDP's communication and
# tokenizing the corpus once: an estimate, not a measured run.
#
#   DATA='corpus/*.jsonl' bash cli/fsdp_700m_8gpu.sh
#   DATA='corpus/*.jsonl' bash cli/fsdp_700m_8gpu.sh --config configs/variants/baseline.yaml   # Table 3 row 1
#
# DATA: the training files, a path or glob (required). CACHE_DIR: tokenizer and token cache
# (default .cache/moda; on a shared filesystem every node reuses it). Extra arguments go to
# `moda fit` after the recipe's own. MODA is the command to call (default `moda`).
set -euo pipefail

# need VAR "what to set it to": stop with one line saying so when VAR is empty.
need() {
    if [[ -z "${!1:-}" ]]; then
        echo "$(basename "$0"): set $1 to $2" >&2
        exit 2
    fi
}

MODA=${MODA:-moda}
need DATA "the training files, a path or glob, e.g. DATA='corpus/*.jsonl' bash $0"
CACHE_DIR=${CACHE_DIR:-.cache/moda}
CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)

# $MODA unquoted: it may be a command with arguments.
$MODA fit --config "$CONFIGS/moda_700m.yaml" \
    --trainer.strategy=fsdp --trainer.devices=8 \
    --data.files="$DATA" --data.cache_dir="$CACHE_DIR" \
    "$@"
