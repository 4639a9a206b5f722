#!/usr/bin/env bash
# The paper's Table 6 24-layer rows (arXiv 2603.15619: width 384, 6 query / 2 KV heads) on one GPU,
# 3 seeds per arm, compared with paired differences: `moda study` over studies/table6_24l.yaml.
# Arms (configs/table6_24l.yaml plus overlays from configs/variants/): baseline and MoDA depth-KV-only
# and MoDA + FFN KV, post-norm (rows 7-9); the pre-norm pair; and the best MoDA arm with the other
# depth-key reading. The corpus is the Python sources of installed packages (torch, transformers,
# sympy); pass --data.files=... for your own.
#
# Time: up to 3 runs share the GPU at a time (runs_per_gpu in the study file; they need about 120 GB
# together, so on an 80 GB GPU pass --runs-per-gpu 1); 18 runs of 100M tokens
# each, about 8 GPU-minutes per baseline run and 11 per MoDA run on an H200 (docs/quality.md).
# Finished runs are skipped and interrupted ones resume,
# so the same command continues the study; the report is runs/studies/table6_24l/study.md.
#
#   bash cli/table6_study_1gpu.sh                      # run what is missing, write study.md / study.png
#   bash cli/table6_study_1gpu.sh --dry-run            # list the runs and their state
#   bash cli/table6_study_1gpu.sh --data.files='corpus/*.jsonl' --out runs/studies/my_corpus
#
# MODA is the command to call (default `moda`).
set -euo pipefail
MODA=${MODA:-moda}
STUDY="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/studies/table6_24l.yaml"
exec $MODA study --config "$STUDY" "$@"
