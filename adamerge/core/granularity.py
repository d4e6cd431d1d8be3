"""How the learnable coefficients are laid out over the merged tensors.

A granularity is compiled once against the ordered tensor names into a
:class:`CoefficientLayout`: G named groups and, for every tensor, the index of its group. Each
task then owns one coefficient per group, so the coefficients form a ``(K, G)`` matrix.

- :class:`TaskWise`: one group for the whole model (AdaMerging "task-wise").
- :class:`TensorWise`: one group per parameter tensor — what AdaMerging calls *layer-wise* and
  aTLAS calls *block-wise* (a weight and its bias are separate tensors, hence separate groups).
- :class:`GroupWise`: one group per regex match, timm ``group_matcher`` style: tensors matched by
  the same pattern with the same captured text share a group (``r"^blocks\\.(\\d+)\\."`` gives one
  coefficient per transformer block).
- :class:`ChunkWise`: each tensor split into chunks with their own coefficients: contiguous pieces
  of the flattened tensor (Expert Merging++), or seeded random partitions of its entries (aTLAS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoefficientLayout:
    """Result of compiling a granularity: group names and each tensor's group index.

    Attributes:
        group_names: the G group names, in first-appearance order.
        tensor_names: merged tensor names, in model order.
        tensor_groups: for each tensor (same order), the index of its (first) group.
        tensor_chunks: for each tensor, how many chunks it is split into; chunk ``c`` of tensor
            ``i`` uses group ``tensor_groups[i] + c`` (1 everywhere except for :class:`ChunkWise`).
        partition_seed: ``None`` for contiguous chunks; else chunks are random partitions of the
            entries, drawn from this seed (one permutation per tensor).
    """

    group_names: tuple[str, ...]
    tensor_names: tuple[str, ...]
    tensor_groups: tuple[int, ...]
    tensor_chunks: tuple[int, ...] = ()
    partition_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.tensor_chunks:
            object.__setattr__(self, "tensor_chunks", (1,) * len(self.tensor_names))

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def group_of(self, tensor_name: str) -> int:
        return self.tensor_groups[self.tensor_names.index(tensor_name)]

    @classmethod
    def from_keys(cls, tensor_names: Sequence[str], keys: Sequence[str]) -> CoefficientLayout:
        """Group tensors sharing a key; groups keep the order in which their key first appears."""
        order: dict[str, int] = {}
        groups = tuple(order.setdefault(key, len(order)) for key in keys)
        return cls(tuple(order), tuple(tensor_names), groups)


def chunk_bounds(numel: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous, nearly equal ``(start, stop)`` ranges covering ``range(numel)``."""
    edges = [round(i * numel / chunks) for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Granularity:
    """Base class: maps an ordered list of tensor names (and their sizes) to a layout."""

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        raise NotImplementedError


class TaskWise(Granularity):
    """One coefficient per task for the whole model."""

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        return CoefficientLayout.from_keys(tensor_names, ["all"] * len(tensor_names))


class TensorWise(Granularity):
    """One coefficient per task and parameter tensor (AdaMerging's "layer-wise")."""

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        return CoefficientLayout.from_keys(tensor_names, list(tensor_names))


# the block index in a tensor name: ``layers.3.``, ``h.3.`` (GPT-2), ``blocks.3.``, ``resblocks.3.``, ``features.3.``, ...
BLOCK_PATTERN = r"(?:^|\.)(?:blocks|block|layers|layer|features|resblocks|stages|h)\.?(\d+)(?:\.|$)"


class BlockWise(Granularity):
    """One coefficient per task and block: every tensor of block ``i`` (a decoder layer, a
    transformer block, a stage) shares one λ; a tensor outside the blocks (embeddings, the final
    norm, an LM head) has its own.

    Args:
        pattern: regex whose first group is the block index (default :data:`BLOCK_PATTERN`).
    """

    def __init__(self, pattern: str = BLOCK_PATTERN) -> None:
        self.pattern = re.compile(pattern)

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        keys = []
        for name in tensor_names:
            match = self.pattern.search(name)
            keys.append(f"{name[: match.start(1)]}{match.group(1)}" if match else name)  # "model.layers.3" or the tensor
        return CoefficientLayout.from_keys(tensor_names, keys)


class GroupWise(Granularity):
    """One coefficient per task and regex group of tensors.

    Args:
        patterns: regular expressions tried in order against each tensor name (``re.search``); the
            first that matches decides the group, keyed by the pattern and its captured groups.
        unmatched: group name for tensors no pattern matches (``None``: refuse them).
    """

    def __init__(self, patterns: Sequence[str], unmatched: str | None = "other") -> None:
        if not patterns:
            raise AdamergeError("GroupWise needs at least one regex pattern")
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise AdamergeError(f"group pattern {pattern!r} is not a valid regex: {error}") from None
        self.patterns = compiled
        self.unmatched = unmatched

    def _key(self, name: str) -> str | None:
        for pattern in self.patterns:
            match = pattern.search(name)
            if match:
                captured = ".".join(g for g in match.groups() if g is not None)
                return f"{pattern.pattern}[{captured}]" if captured else pattern.pattern
        return None

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        keys = []
        unmatched = []
        for name in tensor_names:
            key = self._key(name)
            if key is None:
                unmatched.append(name)
                key = self.unmatched
            keys.append(key)
        if unmatched:
            if self.unmatched is None:
                raise AdamergeError(
                    f"{len(unmatched)} tensor(s) match no group pattern ({[p.pattern for p in self.patterns]}), e.g. {unmatched[:3]}"
                )
            logger.info("%d tensor(s) match no group pattern; they share group %r", len(unmatched), self.unmatched)
        return CoefficientLayout.from_keys(tensor_names, keys)


class ChunkWise(Granularity):
    """One coefficient per task and chunk of each tensor.

    Args:
        chunks: chunks per tensor: one number for every tensor, or ``{tensor name: count}`` (tensors
            not named get 1). A count is capped at the tensor's number of entries.
        partition: ``contiguous`` (pieces of the flattened tensor, Expert Merging++) or ``random``
            (seeded random partitions of the entries, aTLAS).
        seed: seed of the random partitions.
    """

    def __init__(self, chunks: int | Mapping[str, int], partition: str = "contiguous", seed: int = 0) -> None:
        if partition not in ("contiguous", "random"):
            raise AdamergeError(f"partition {partition!r}: expected 'contiguous' or 'random'")
        counts = chunks.values() if isinstance(chunks, Mapping) else [chunks]
        if any(int(c) < 1 for c in counts):
            raise AdamergeError(f"chunk counts must be >= 1, got {chunks!r}")
        self.chunks = chunks
        self.partition = partition
        self.seed = seed

    def compile(self, tensor_names: Sequence[str], numels: Sequence[int] | None = None) -> CoefficientLayout:
        if numels is None:
            raise AdamergeError("ChunkWise needs the tensor sizes (numels) to compile")
        group_names: list[str] = []
        groups, counts = [], []
        for name, numel in zip(tensor_names, numels, strict=True):
            wanted = self.chunks.get(name, 1) if isinstance(self.chunks, Mapping) else self.chunks
            count = max(1, min(int(wanted), int(numel)))
            groups.append(len(group_names))
            counts.append(count)
            group_names.extend([name] if count == 1 else [f"{name}#{c}" for c in range(count)])
        seed = self.seed if self.partition == "random" else None
        return CoefficientLayout(tuple(group_names), tuple(tensor_names), tuple(groups), tuple(counts), seed)


def parse_granularity(spec: str | Granularity) -> Granularity:
    """Granularity from a command-line spec.

    ``task`` | ``layer`` (alias ``tensor``) | ``block`` (one λ per block, :class:`BlockWise`) |
    ``group:REGEX[;REGEX...]`` | ``chunk:N`` (contiguous) | ``partition:N`` (random partitions, aTLAS).
    """
    if isinstance(spec, Granularity):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "task" and not rest:
        return TaskWise()
    if kind in ("layer", "tensor") and not rest:
        return TensorWise()
    if kind == "block" and not rest:
        return BlockWise()
    if kind == "group" and rest:
        return GroupWise(rest.split(";"))
    if kind in ("chunk", "partition") and rest.isdigit():
        return ChunkWise(int(rest), "contiguous" if kind == "chunk" else "random")
    raise AdamergeError(
        f"granularity {spec!r}: expected 'task', 'layer' (or 'tensor'), 'block', 'group:REGEX[;REGEX...]', 'chunk:N' or 'partition:N'"
    )
