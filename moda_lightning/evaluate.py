"""``moda eval``: score text with a trained checkpoint, without training.

Usage::

    moda eval --ckpt_path CKPT --files PATTERN [PATTERN ...] [--text_field F] [--seq_len N]
              [--batch_size B] [--device cpu|cuda|auto] [--json OUT.json]

Prints the mean next-token loss (nats per token), the perplexity and the bits per byte of the
files, and how many documents, tokens and bytes were scored; ``--json`` also writes them to a file.
See docs/evaluation.md for what exactly is scored and how to compare the numbers.

The text is read as ``moda fit`` reads ``--data.files`` (``.txt`` files are one document each,
``.jsonl`` lines one document each, globs, ``pkg:NAME``) and tokenized with the tokenizer the
checkpoint carries. Documents are joined as in training: each one followed by the end-of-text
token. One more end-of-text token goes in front of the first document, so that every token of
every document (and each document's closing end-of-text) is predicted, from the same context a
document after the first one has in training. The stream is cut into windows of ``seq_len + 1``
tokens with stride ``seq_len``, as the validation windows of ``moda fit`` are: the last token of a
window is the first of the next, so every token after the leading end-of-text is predicted exactly
once, and windows share no other context. The last window is padded and its padding not scored.

Every problem with the input (checkpoint, files, flags, device) is a ``ValueError`` raised before
any scoring starts; ``moda eval`` prints it as one ``moda: error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import __version__ as tqdm_version
from tqdm import tqdm

from moda_lightning.data import tokenizer as tk
from moda_lightning.data.corpus import Corpus
from moda_lightning.data.token_cache import document_batches
from moda_lightning.trained import build_model, check_weights, open_checkpoint, resolve_device

_IGNORE = -100
"""Target id of padding: ``cross_entropy`` leaves it out of the sum."""

_SHOW_AFTER = {"delay": 2.0} if tuple(int(x) for x in tqdm_version.split(".")[:2]) >= (4, 60) else {}
"""Progress bars appear only once a step has run this long (tqdm >= 4.60): a short input prints none."""



@dataclass(frozen=True)
class EvalResult:
    """What ``moda eval`` reports, with the totals the means are made of."""

    documents: int
    """Documents scored (empty ones are skipped, as in training)."""
    tokens: int
    """Tokens predicted: every token of every document plus one end-of-text token after each."""
    bytes: int
    """UTF-8 bytes of the documents' text (the separators are not text)."""
    nll_nats: float
    """Summed negative log-likelihood of the predicted tokens, in nats."""
    loss: float
    """``nll_nats / tokens``: mean next-token cross-entropy in nats, as ``val/loss`` in training."""
    perplexity: float
    """``exp(loss)``."""
    bits_per_byte: float
    """``nll_nats / ln 2 / bytes``: comparable between tokenizers, unlike ``loss``."""
    windows: int
    """Windows of ``seq_len + 1`` tokens the stream was cut into (the last one may be shorter)."""
    seq_len: int
    """Tokens predicted per window (at most)."""
    attention: str
    """Attention backend that scored the text (the checkpoint's, or its portable twin)."""
    device: str
    """Device that scored the text."""
    files: tuple[str, ...]
    """The files read, resolved (globs expanded), in the order they were scored."""


def _in_eval_words(message: str) -> str:
    """A message of the shared data checks, with this command's flags: they speak of ``moda fit``'s."""
    for old, new in {"--data.files": "--files", "--data.text_field": "--text_field"}.items():
        message = message.replace(old, new)
    return message


# --- the text ------------------------------------------------------------------------------------


@dataclass
class TokenStream:
    """The scored text as one token stream: end-of-text, then each document followed by end-of-text."""

    tokens: Tensor
    """Token ids ``[tokens + 1]`` (unsigned, compact); the first is the leading end-of-text."""
    documents: int
    bytes: int


def read_corpus(files: str | Sequence[str], text_field: str) -> Corpus:
    """The files as ``moda fit`` would read them (paths, globs, ``pkg:NAME``), resolved now.

    Raises:
        ValueError: If a glob matches nothing, a path is missing, a directory or unreadable.
    """
    try:
        return Corpus(list(files) if not isinstance(files, str) else files, text_field=text_field)
    except ValueError as err:
        raise ValueError(_in_eval_words(str(err))) from None


def tokenize(corpus: Corpus, tokenizer: Tokenizer) -> TokenStream:
    """Tokenize every document as the token cache of ``moda fit`` does (no special tokens added,
    end-of-text after each) and count the documents' UTF-8 bytes.

    Raises:
        ValueError: If a file is not UTF-8, a ``.jsonl`` line is not JSON or lacks the text field,
            or no document has any text.
    """
    eot = tk.eot_id(tokenizer)
    big = tk.vocab_size_of(tokenizer) > 1 << 16
    ids = array.array("I" if big else "H", [eot])
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no character offsets
    documents = n_bytes = 0
    progress = tqdm(desc="tokenizing", unit=" docs", mininterval=2.0, leave=False, file=sys.stderr, **_SHOW_AFTER)
    try:
        for batch in document_batches(corpus.documents()):
            for encoding in encode(batch, add_special_tokens=False):
                ids.extend(encoding.ids)
                ids.append(eot)
            documents += len(batch)
            n_bytes += sum(len(doc.encode("utf-8")) for doc in batch)
            progress.update(len(batch))
    except ValueError as err:
        raise ValueError(_in_eval_words(str(err))) from None
    finally:
        progress.close()
    if documents == 0:
        raise ValueError(_in_eval_words(str(corpus.empty_error())))
    return TokenStream(torch.frombuffer(ids, dtype=torch.uint32 if big else torch.uint16), documents, n_bytes)


# --- scoring -------------------------------------------------------------------------------------


def window_starts(n_tokens: int, seq_len: int) -> range:
    """First stream position of each window: windows of ``seq_len + 1`` tokens, stride ``seq_len``,
    over a stream of ``n_tokens + 1`` tokens; the last may be shorter, none is dropped."""
    return range(0, n_tokens, seq_len)


def score_stream(
    model: torch.nn.Module, tokens: Tensor, seq_len: int, batch_size: int, device: torch.device, pad_id: int
) -> tuple[float, int]:
    """Summed next-token NLL (nats) of every token of ``tokens`` but the first, and the window count.

    Windows go ``batch_size`` at a time; a short last window is padded with ``pad_id``, whose
    targets are ignored (attention is causal, so padding after a token changes nothing before it).
    On CUDA the forward runs under bf16 autocast, as training does; the loss is summed in fp32
    per batch and in fp64 across batches.
    """
    n_tokens = len(tokens) - 1
    starts = window_starts(n_tokens, seq_len)
    on_gpu = device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if on_gpu and torch.cuda.is_bf16_supported()
        else contextlib.nullcontext()
    )
    total = torch.zeros((), dtype=torch.float64, device=device)
    progress = tqdm(
        total=n_tokens,
        desc="scoring",
        unit="tok",
        unit_scale=True,
        mininterval=1.0,
        leave=False,
        file=sys.stderr,
        disable=len(starts) <= batch_size,  # one batch: nothing to watch
        **_SHOW_AFTER,
    )
    with torch.inference_mode(), autocast, progress:
        for first in range(0, len(starts), batch_size):
            batch = starts[first : first + batch_size]
            inputs = torch.full((len(batch), seq_len), pad_id, dtype=torch.int64)
            targets = torch.full((len(batch), seq_len), _IGNORE, dtype=torch.int64)
            for row, start in enumerate(batch):
                window = tokens[start : start + seq_len + 1].to(torch.int64)
                inputs[row, : len(window) - 1] = window[:-1]
                targets[row, : len(window) - 1] = window[1:]
            scored = int((targets != _IGNORE).sum())
            inputs = inputs.to(device, non_blocking=on_gpu)
            targets = targets.to(device, non_blocking=on_gpu)
            logits = model(inputs)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=_IGNORE, reduction="sum")
            total += nll.double()  # stays on the device: no wait for the GPU per batch
            progress.update(scored)
    return float(total), len(starts)


def evaluate(
    ckpt_path: str | os.PathLike[str],
    files: str | Sequence[str],
    *,
    text_field: str = "text",
    seq_len: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    say: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score ``files`` with the checkpoint at ``ckpt_path`` (see the module docstring for what is scored).

    Args:
        ckpt_path: A checkpoint written by ``moda fit``.
        files: Paths, globs or ``pkg:NAME``, as ``--data.files`` takes them.
        text_field: The field of each ``.jsonl`` line that holds its text.
        seq_len: Tokens predicted per window; default the checkpoint's training ``seq_len``.
        batch_size: Windows per forward pass; default the checkpoint's training batch size.
        device: ``cpu``, ``cuda`` or ``auto``.
        say: Called with each one-line note (a switched backend); default prints to stderr.

    Raises:
        ValueError: Every problem with the inputs, before any scoring.
    """
    say = say or (lambda line: print(f"moda eval: {line}", file=sys.stderr))
    for name, value in (("--seq_len", seq_len), ("--batch_size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} {value} is not a positive number of tokens or windows; pass 1 or more.")
    target = resolve_device(device)
    corpus = read_corpus(files, text_field)
    ckpt = open_checkpoint(ckpt_path, target)
    max_len = ckpt.config.max_seq_len
    seq_len = seq_len or min(ckpt.trained_seq_len or max_len, max_len)
    if seq_len > max_len:
        raise ValueError(
            f"--seq_len {seq_len} is longer than the model's max_seq_len={max_len} (its rotary table ends there); "
            f"pass --seq_len {max_len} or less."
        )
    batch_size = batch_size or ckpt.trained_batch_size or 8
    stream = tokenize(corpus, ckpt.tokenizer)
    check_weights(ckpt)
    model = build_model(ckpt, target)
    for note in ckpt.notes:
        say(note)

    nll, windows = score_stream(model, stream.tokens, seq_len, batch_size, target, pad_id=tk.eot_id(ckpt.tokenizer))
    n_tokens = len(stream.tokens) - 1
    loss = nll / n_tokens
    return EvalResult(
        documents=stream.documents,
        tokens=n_tokens,
        bytes=stream.bytes,
        nll_nats=nll,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_byte=nll / math.log(2) / stream.bytes,
        windows=windows,
        seq_len=seq_len,
        attention=ckpt.config.attention,
        device=str(target),
        files=tuple(str(p) for p in corpus.paths or ()),
    )


# --- the command -----------------------------------------------------------------------------------


class _RaisingParser(argparse.ArgumentParser):
    """A flag mistake is a ValueError, so ``moda eval`` reports it in one line like any other input problem."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{message} (`moda eval --help` lists every option)")


def _parser() -> argparse.ArgumentParser:
    parser = _RaisingParser(
        prog="moda eval",
        description="Score text files with a checkpoint of `moda fit`: mean next-token loss, perplexity and bits "
        "per byte (see docs/evaluation.md).",
        # a unique prefix would silently stand for a whole flag (--seq for --seq_len)
        allow_abbrev=False,
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by moda fit (.ckpt)")
    parser.add_argument(
        "--files",
        required=True,
        nargs="+",
        metavar="PATTERN",
        help="files to score: paths, globs ('corpus/*.jsonl') or pkg:NAME, read as --data.files is in moda fit",
    )
    parser.add_argument("--text_field", default="text", help="the field of each .jsonl line that holds its text (default: text)")
    parser.add_argument("--seq_len", type=int, help="tokens predicted per window (default: the seq_len it was trained with)")
    parser.add_argument("--batch_size", type=int, help="windows per forward pass (default: the training batch size)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to score (default: auto)")
    parser.add_argument("--json", dest="json_path", metavar="OUT.json", help="also write the numbers to this JSON file")
    return parser


def _check_json_target(path: str) -> Path:
    """Refuse an output file that could not be written, before the scoring it would hold the result of."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path} is a directory; pass a file name such as {target / 'eval.json'}.")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--json {path}: the folder {folder} does not exist; create it or write the file elsewhere.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--json {path}: the folder {folder} is not writable; write the file elsewhere.")
    return target


def format_result(result: EvalResult, ckpt_path: str) -> str:
    """The lines ``moda eval`` prints."""
    shown = ", ".join(result.files[:3]) + (f" and {len(result.files) - 3} more" if len(result.files) > 3 else "")
    return "\n".join(
        [
            f"moda eval: {ckpt_path} on {len(result.files)} file(s): {shown}",
            f"  scored            {result.documents:,} documents, {result.tokens:,} tokens, {result.bytes:,} bytes "
            f"({result.windows:,} windows of {result.seq_len} tokens, {result.attention} on {result.device})",
            f"  loss              {result.loss:.4f} nats/token",
            f"  perplexity        {result.perplexity:.3f}",
            f"  bits per byte     {result.bits_per_byte:.4f}",
        ]
    )


def main(argv: list[str]) -> int:
    """``moda eval ARGS``: print (and with ``--json`` write) the scores; 0 on success.

    Raises:
        ValueError: A bad flag or input, with what was wrong and what to do, before any scoring.
    """
    args = _parser().parse_args(argv)
    json_target = _check_json_target(args.json_path) if args.json_path else None
    result = evaluate(
        args.ckpt_path,
        args.files,
        text_field=args.text_field,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(format_result(result, args.ckpt_path), flush=True)
    if json_target is not None:
        record = {"ckpt_path": str(args.ckpt_path), "text_field": args.text_field, **asdict(result)}
        tmp = json_target.with_name(f".{json_target.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, json_target)  # never a half-written file where a reader looks
    return 0
