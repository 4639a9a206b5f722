"""The training data order: a seeded shuffle per epoch that a resumed run continues exactly.

Lightning saves a loader's position in the checkpoint when the loader has ``state_dict`` /
``load_state_dict``, and restores it before the first batch of a resumed run; a plain DataLoader
has neither, so a run resumed mid-epoch would start the epoch's order again and train on batches
it has already seen. Here the order of epoch ``e`` is a pure function of ``(seed, e)``, so the
position is just (epoch, batches done) and resuming skips the indices of the batches already done
without loading them.

The order is the one a ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
with ``num_workers=0`` gives (the project's order before it was resumable), so runs started before
and after are trained on the same batches: per epoch that loader draws one int64 from the generator
for its worker seed, one permutation for the epoch, and one more permutation when the epoch's last
batch has been taken (``RandomSampler`` evaluates its trailing partial pass, empty here).

Across ranks, the epoch's permutation (cut to a multiple of the world size) is dealt round-robin,
as ``DistributedSampler`` does; Lightning leaves a ``DistributedSampler`` in place, so this one is
used on every rank instead of a sampler with a seed of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def epoch_permutation(n: int, seed: int, epoch: int, memo: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The order of ``n`` items in epoch ``epoch`` (from 0) of a run seeded with ``seed``.

    ``memo`` (epoch -> generator state at that epoch's start) makes consecutive epochs cost one
    permutation each instead of replaying every earlier epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    start = 0
    if memo:
        known = [e for e in memo if e <= epoch]
        if known:
            start = max(known)
            generator.set_state(memo[start])
    for _ in range(start, epoch):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's worker seed
        torch.randperm(n, generator=generator)  # the epoch's order
        torch.randperm(n, generator=generator)  # RandomSampler's empty trailing pass
    if memo is not None:
        memo[epoch] = generator.get_state()
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)


class ResumableShuffle(DistributedSampler):
    """Seeded per-epoch shuffle of a dataset's indices for one rank, resumable mid-epoch.

    Args:
        dataset: What is sampled (only its length is used).
        seed: Decides every epoch's order.
        num_replicas: Ranks sharing the data (1 without distributed training).
        rank: This rank.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._memo: dict[int, torch.Tensor] = {}
        self._resume: tuple[int, int] | None = None  # (epoch, indices of it already used on this rank)
        self._passes = 0
        self._epoch_given = False

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at each epoch's start; without it, each new pass is the next epoch."""
        super().set_epoch(epoch)
        self._epoch_given = True

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order."""
        order = epoch_permutation(len(self.dataset), self.seed, epoch, self._memo)[: self.total_size]
        return order[self.rank :: self.num_replicas].tolist()

    def resume(self, epoch: int, done: int) -> None:
        """Start the next pass over ``epoch`` after its first ``done`` indices (on this rank)."""
        self._resume = (epoch + 1, 0) if done >= self.num_samples else (epoch, done)

    def __iter__(self) -> Iterator[int]:
        # A generator: the pass counts (and a plain loop over the loader reshuffles) only once
        # it is read, not when a loader merely creates an iterator.
        if self._passes and not self._epoch_given:
            self.epoch += 1
        self._passes += 1
        self._epoch_given = False
        indices = self.indices(self.epoch)
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
            self._resume = None
        yield from indices[skip:]


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableShuffle` whose position Lightning checkpoints.

    ``batches_done`` is set by whoever drives the loader (the data module points it at the
    trainer's count of training batches processed this epoch): the loader itself runs ahead of
    training by its prefetched batches, so it cannot count them.
    """

    batches_done: Callable[[], int] | None = None

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        assert isinstance(sampler, ResumableShuffle)
        done = self.batches_done() if self.batches_done is not None else 0
        return {"epoch": sampler.epoch, "batches_done": done, "batch_size": self.batch_size, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, ResumableShuffle)
        if state.get("batch_size") != self.batch_size or state.get("seed") != sampler.seed:
            raise ValueError(
                f"data: the checkpoint's data position is for batch_size={state.get('batch_size')}, "
                f"seed={state.get('seed')}, but this run has batch_size={self.batch_size}, seed={sampler.seed}; "
                "resume with the run's own --data.batch_size and --data.seed"
            )
        sampler.resume(int(state["epoch"]), int(state["batches_done"]) * int(self.batch_size))
