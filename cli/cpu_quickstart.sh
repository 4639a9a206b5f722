#!/usr/bin/env bash
# The default MoDA model (configs/default.yaml: 4 layers, width 192, MoDA through the portable
# PyTorch backend) on the built-in corpus, Python's own documentation, on a laptop CPU.
# About 2-4 minutes on 2 CPU cores, tokenizer training included; no GPU, no download.
#
#   bash cli/cpu_quickstart.sh                              # runs/default/moda_torch-pre/version_N
#   bash cli/cpu_quickstart.sh --model.attention=sdpa       # the baseline: any `moda fit` flag passes through
#   tensorboard --logdir runs
#
# MODA is the command to call (default `moda`; e.g. MODA="python -m moda_lightning.cli").
set -euo pipefail

MODA=${MODA:-moda}
CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)

# $MODA unquoted: it may be a command with arguments.
$MODA fit --config "$CONFIGS/default.yaml" "$@"
