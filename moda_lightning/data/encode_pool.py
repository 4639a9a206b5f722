"""Tokenize batches of text on every core, in order: the same ids whatever the number of processes.

`encode_in_order` turns an iterator of text batches into an iterator of id arrays, one per batch and
in the batches' order. With one process it encodes in this process; with more, a pool of worker
processes (each holding the tokenizer) encodes them, and at most ``2 * num_proc`` batches are in
flight, so memory stays bounded however long the input is and the reader never runs far ahead.
Each document is encoded alone (no state carries from one to the next), so how batches are dealt
out cannot change an id.
"""

from __future__ import annotations

import array
import collections
import contextlib
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer

IN_FLIGHT_PER_PROCESS = 2
"""Batches queued per worker: one being encoded, one waiting, so no worker idles between batches."""


@dataclass(frozen=True)
class TextBatch:
    """Texts to encode; `ends` says which are a document's last piece (end-of-text follows them)."""

    texts: list[str]
    ends: list[bool]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and job schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Encoder:
    """Encodes a `TextBatch` into packed ids: each text's ids, then `eot_id` after each document's end."""

    def __init__(self, tokenizer: Tokenizer, eot_id: int, typecode: str) -> None:
        self.eot_id, self.typecode = eot_id, typecode
        # encode_batch_fast skips character offsets we do not use (tokenizers >= 0.20.2).
        self.encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def __call__(self, batch: TextBatch) -> array.array:
        ids = array.array(self.typecode)
        for encoding, ends in zip(self.encode(batch.texts, add_special_tokens=False), batch.ends):
            ids.extend(encoding.ids)
            if ends:
                ids.append(self.eot_id)
        return ids


_worker_encoder: _Encoder | None = None


def _start_worker(tokenizer_json: str, eot_id: int, typecode: str) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(Tokenizer.from_str(tokenizer_json), eot_id, typecode)


def _encode_in_worker(batch: TextBatch) -> bytes:
    assert _worker_encoder is not None, "the pool initializer did not run"
    return _worker_encoder(batch).tobytes()


@contextlib.contextmanager
def _no_tokenizer_threads() -> Iterator[None]:
    """Workers encode one batch each on one core: the tokenizer's own thread pool would only
    oversubscribe them (and warns when a process that used it forks)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_in_order(
    batches: Iterable[TextBatch],
    tokenizer: Tokenizer,
    eot_id: int,
    typecode: str,
    num_proc: int,
) -> Iterator[array.array]:
    """The ids of each batch, in the batches' order.

    Args:
        batches: The text, already cut into batches (`token_cache.text_batches`).
        tokenizer: Encodes the text; copied into each worker.
        eot_id: Appended after each document's last piece.
        typecode: The ``array`` type of the ids (``"H"`` for uint16, ``"I"``/``"L"`` for uint32).
        num_proc: Processes that encode; 1 encodes here (with the tokenizer's own threads).

    Returns:
        One array of ids per batch; the concatenation is the same for every `num_proc`.
    """
    if num_proc <= 1:
        encoder = _Encoder(tokenizer, eot_id, typecode)
        yield from (encoder(batch) for batch in batches)
        return
    # fork shares the parent's loaded modules: a worker starts in milliseconds, not seconds.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with _no_tokenizer_threads():
        pool = multiprocessing.get_context(method).Pool(
            num_proc,
            initializer=_start_worker,
            initargs=(tokenizer.to_str(), eot_id, typecode),
        )
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= IN_FLIGHT_PER_PROCESS * num_proc:
                yield array.array(typecode, pending.popleft().get())
        while pending:
            yield array.array(typecode, pending.popleft().get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()
