"""A ``DataLoader`` whose position survives a checkpoint, so that a resumed fit sees exactly the
batches an uninterrupted one would have seen.

Lightning saves ``state_dict()`` of every loader of the training ``CombinedLoader`` that has one
(its ``_Stateful`` protocol) into the checkpoint, and hands it back through
``load_state_dict()`` on resume. The state is the random generator's state when the current pass
over the data began and the number of batches served in that pass; on resume the pass is
replayed from that state and its first batches are skipped at the sampler, as indices (no data is
read for them). The order of the batches is the one of a plain ``DataLoader(shuffle=...,
generator=...)``: the samplers are the same (:class:`torch.utils.data.RandomSampler` with the
loader's generator, ``SequentialSampler``, ``DistributedSampler``), only able to skip.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler


class _Skipping:
    """Sampler mixin: the next pass drops its first ``skip`` indices (after drawing them)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)  # type: ignore[misc]


class SkippingRandomSampler(_Skipping, RandomSampler):
    """:class:`RandomSampler` that can skip the start of its next pass."""


class SkippingSequentialSampler(_Skipping, SequentialSampler):
    """:class:`SequentialSampler` that can skip the start of its next pass."""


class SkippingDistributedSampler(_Skipping, DistributedSampler):
    """:class:`DistributedSampler` that can skip the start of its next pass."""


class ResumableLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (see the module docstring).

    Args:
        dataset: the items.
        batch_size: items per batch (the last batch of a pass may be smaller).
        shuffle: draw a new permutation per pass from ``generator``.
        generator: the loader's random generator (also seeds workers, as in a plain DataLoader).
        distributed: shard with a ``DistributedSampler`` (per-rank share, ``seed``, ``shuffle``).
        seed: seed of the distributed sampler.
        **options: the other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator,
        distributed: bool = False,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if distributed:
            sampler: _Skipping = SkippingDistributedSampler(dataset, shuffle=shuffle, seed=seed)
        elif shuffle:
            sampler = SkippingRandomSampler(dataset, generator=generator)
        else:
            sampler = SkippingSequentialSampler(dataset)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **options)
        self._pass_start: torch.Tensor | None = None  # generator state when the current pass began
        self._served = 0  # batches served in the current pass
        self._resume: tuple[torch.Tensor | None, int] | None = None
        self.epoch_peers: list[ResumableLoader] = [self]  # the loaders stepped together (share_epochs)

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            if state is not None:
                self.generator.set_state(state)
        if skip >= len(self):
            # the pass had been served whole but not yet run dry: run it dry (the sampler's draws
            # at its end included, no data read), then a new pass follows as it did
            self.sampler.skip = skip * self.batch_size  # type: ignore[union-attr]
            for _ in super().__iter__():
                pass
            skip = 0
        self._pass_start = self.generator.get_state()
        self._served = skip
        self.sampler.skip = skip * self.batch_size  # type: ignore[union-attr]
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from: ``generator`` (state to replay the pass from) and
        ``skip`` (batches of that pass already served). A pass served whole is replayed too:
        samplers draw again when they are run dry (``RandomSampler`` draws a permutation it then
        cuts to nothing), which happens only when the next batch is asked for."""
        if self._pass_start is None or self._epoch_over():  # every loader begins a new pass
            return {"generator": self.generator.get_state(), "skip": 0}
        return {"generator": self._pass_start, "skip": self._served}  # skip == len(self): served whole

    def _epoch_over(self) -> bool:
        """Whether the epoch of the loaders stepped together has ended: then every loader begins a
        new pass, also those in the middle of one (``max_size_cycle``: an epoch is one pass of the
        longest loader)."""
        longest = max(len(p) for p in self.epoch_peers)
        return any(len(p) == longest and p._pass_start is not None and p._served >= longest for p in self.epoch_peers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` at the next pass."""
        self._resume = (state.get("generator"), int(state.get("skip", 0)))


def share_epochs(loaders: Iterable[ResumableLoader]) -> None:
    """Tell loaders that a ``CombinedLoader`` steps together (``max_size_cycle``) about each other,
    so that a checkpoint at the end of an epoch restarts all of them (see :meth:`ResumableLoader._epoch_over`)."""
    group = [loader for loader in loaders if isinstance(loader, ResumableLoader)]
    for loader in group:
        loader.epoch_peers = group
