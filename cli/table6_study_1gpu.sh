#!/usr/bin/env bash
# The paper's Table 6 24-layer rows (arXiv 2603.15619: width 384, 6 query / 2 KV heads) on one GPU,
# several seeds, on your own corpus. Arms, each configs/table6_24l.yaml plus overlays from configs/variants/:
#
#   baseline-post     Table 6 row 7: baseline (sequence attention only), post-norm
#   moda-depth-post   row 8: MoDA, attention K/V as depth slots only (Table 3 row 3), post-norm
#   moda-ffn-post     row 9: MoDA with FFN K/V (Table 3 row 4), post-norm
#   baseline-pre      the pre-norm pair: baseline, pre-norm
#   moda-ffn-pre                         MoDA with FFN K/V, pre-norm
#
# Time: 20000 steps of 16 x 2048 tokens per run; at the step times measured on an H100 in bf16
# (docs/flops.md: 218 ms MoDA, 152 ms baseline) about 1.2 h per MoDA run and 0.8 h per baseline
# run, so about 5.3 h per seed and 16 h for the default 5 arms x 3 seeds, plus tokenizing the
# corpus once (cached in .cache/moda).
#
#   CORPUS='data/fineweb-edu/*.jsonl' bash cli/table6_study_1gpu.sh
#   CORPUS=... SEEDS="0 1 2 3 4" ARMS="baseline-post moda-ffn-post" bash cli/table6_study_1gpu.sh --trainer.max_steps=5000
#
# CORPUS: the training files, a path or glob (required). SEEDS, ARMS: what to run (defaults:
# "0 1 2" and all five). RUNS: where runs go (default runs), one folder per run:
# $RUNS/table6_24l/<arm>/seed<S>. A run whose folder holds `finished` is skipped; one that
# stopped early resumes from its checkpoints/last.ckpt; a run that fails stops the study.
# Extra arguments go to every `moda fit`.
# MODA is the command to call (default `moda`).
set -euo pipefail

# need VAR "what to set it to": stop with one line saying so when VAR is empty.
need() {
    if [[ -z "${!1:-}" ]]; then
        echo "$(basename "$0"): set $1 to $2" >&2
        exit 2
    fi
}

MODA=${MODA:-moda}
RUNS=${RUNS:-runs}
SEEDS=${SEEDS:-0 1 2}
ARMS=${ARMS:-baseline-post moda-depth-post moda-ffn-post baseline-pre moda-ffn-pre}
need CORPUS "the training files, a path or glob, e.g. CORPUS='data/fineweb-edu/*.jsonl' bash $0"
CONFIGS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../configs" && pwd)

# Overlays on configs/table6_24l.yaml (MoDA with FFN K/V, pre-norm), stacked in this order.
declare -A OVERLAYS=(
    [baseline-post]="variants/baseline.yaml variants/post_norm.yaml"
    [moda-depth-post]="variants/table3_row3.yaml variants/post_norm.yaml"
    [moda-ffn-post]="variants/post_norm.yaml"
    [baseline-pre]="variants/baseline.yaml"
    [moda-ffn-pre]=""
)
for arm in $ARMS; do  # check every name before the first run starts
    if [[ ! -v "OVERLAYS[$arm]" ]]; then
        echo "table6_study_1gpu.sh: unknown arm '$arm' in ARMS; choose among: ${!OVERLAYS[*]}" >&2
        exit 2
    fi
done

# Seeds outer, arms inner: every arm of seed 0 finishes before seed 1 starts, so a first
# comparison is ready early.
for seed in $SEEDS; do
    for arm in $ARMS; do
        dir="$RUNS/table6_24l/$arm/seed$seed"
        if [[ -e "$dir/finished" ]]; then
            echo "table6_study_1gpu.sh: $dir is finished; skipping"
            continue
        fi
        args=(fit --config "$CONFIGS/table6_24l.yaml")
        for overlay in ${OVERLAYS[$arm]}; do
            args+=(--config "$CONFIGS/$overlay")
        done
        args+=(
            --seed_everything="$seed"
            --data.files="$CORPUS"
            --trainer.logger.init_args.save_dir="$RUNS"
            --trainer.logger.init_args.name="table6_24l/$arm"
            --trainer.logger.init_args.version="seed$seed"
        )
        if [[ -f "$dir/checkpoints/last.ckpt" ]]; then
            args+=(--ckpt_path="$dir/checkpoints/last.ckpt")
        fi
        $MODA "${args[@]}" "$@"  # $MODA unquoted: it may be a command with arguments
        # Only a run that trained leaves a checkpoint (not, say, one given --print_config).
        if [[ -f "$dir/checkpoints/last.ckpt" ]]; then
            touch "$dir/finished"
        fi
    done
done
