"""``moda generate``: continue prompts with a trained checkpoint and print the text.

    moda generate --ckpt_path runs/default/moda_torch-pre/version_0/checkpoints/last.ckpt --prompt "def main("
    moda generate --ckpt_path CKPT --prompt "import os" --prompt "class Foo" --max_new_tokens 64 --temperature 0.8 --top_p 0.95
    moda generate --ckpt_path CKPT --prompt "x = " --temperature 0       # greedy

The tokenizer comes from the checkpoint. Several ``--prompt`` run as one batch; generation stops
at the tokenizer's end-of-text token or after ``--max_new_tokens``.
"""

from __future__ import annotations

import argparse

import torch

from moda_lightning.data.tokenizer import eot_id
from moda_lightning.generation.generate import generate
from moda_lightning.generation.sampling import check_sampling
from moda_lightning.trained import load_trained


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moda generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by moda fit")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p)  # before the checkpoint is read
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={args.max_new_tokens}: ask for at least one new token.")
    model, checkpoint = load_trained(args.ckpt_path, args.device)
    for note in checkpoint.notes:
        print(f"moda generate: {note}")
    tokenizer = checkpoint.tokenizer
    prompts = [tokenizer.encode(text).ids for text in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            raise ValueError(f"--prompt {text!r} has no tokens; give some text to continue.")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    continuations = generate(
        model, prompts, args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_id=eot_id(tokenizer, source=f"the checkpoint's tokenizer ({args.ckpt_path})"), generator=generator,
    )  # fmt: skip
    for index, (text, ids) in enumerate(zip(args.prompt, continuations)):
        if len(args.prompt) > 1:
            print(f"--- prompt {index + 1}")
        print(text + tokenizer.decode(ids))
    return 0
