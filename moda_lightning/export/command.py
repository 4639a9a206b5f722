"""``moda export``: a checkpoint from ``moda fit`` as a Hugging Face transformers model folder.

    moda export --ckpt_path runs/default/moda_torch-pre/version_0/checkpoints/last.ckpt --out exported/moda-small
    moda export --ckpt_path CKPT --out DIR --force      # replace DIR if it exists

Then, anywhere with torch and transformers:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

The folder holds config.json, model.safetensors, the tokenizer and the modelling code, generated
from this package's source; see docs/export.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moda_lightning.export import hf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moda export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by moda fit")
    parser.add_argument("--out", required=True, help="the folder to write (created; must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return parser


def main(argv: list[str]) -> int:
    """Run ``moda export``; a ``ValueError`` is a problem the user can fix (printed as one line)."""
    args = build_parser().parse_args(argv)
    # The cheap checks first, so a bad request fails before the checkpoint is read and hashed.
    hf.require_hf_packages()
    out = Path(args.out)
    hf.check_out_dir(out, args.force)
    files, notes = hf.export_checkpoint(args.ckpt_path, out, force=args.force)
    for note in notes:
        print(f"moda export: {note}")
    code = [name for name in files if name.endswith(".py")]
    data = [name for name in files if not name.endswith(".py")]
    print(f"moda export: wrote {out}: {', '.join(data)} and {len(code)} files of modelling code")
    print(f"moda export: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
