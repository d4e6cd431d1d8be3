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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoefficientLayout:
    """Result of compiling a granularity: group names and each tensor's group index.

    Attributes:
        group_names: the G group names, in first-appearance order.
        tensor_names: merged tensor names, in model order.
        tensor_groups: for each tensor (same order), the index of its group in ``group_names``.
    """

    group_names: tuple[str, ...]
    tensor_names: tuple[str, ...]
    tensor_groups: tuple[int, ...]

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


class Granularity:
    """Base class: maps an ordered list of tensor names to a :class:`CoefficientLayout`."""

    def compile(self, tensor_names: Sequence[str]) -> CoefficientLayout:
        raise NotImplementedError


class TaskWise(Granularity):
    """One coefficient per task for the whole model."""

    def compile(self, tensor_names: Sequence[str]) -> CoefficientLayout:
        return CoefficientLayout.from_keys(tensor_names, ["all"] * len(tensor_names))


class TensorWise(Granularity):
    """One coefficient per task and parameter tensor (AdaMerging's "layer-wise")."""

    def compile(self, tensor_names: Sequence[str]) -> CoefficientLayout:
        return CoefficientLayout.from_keys(tensor_names, list(tensor_names))


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

    def compile(self, tensor_names: Sequence[str]) -> CoefficientLayout:
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
                    f"{len(unmatched)} tensor(s) match no group pattern "
                    f"({[p.pattern for p in self.patterns]}), e.g. {unmatched[:3]}"
                )
            logger.info("%d tensor(s) match no group pattern; they share group %r", len(unmatched), self.unmatched)
        return CoefficientLayout.from_keys(tensor_names, keys)


def parse_granularity(spec: str | Granularity) -> Granularity:
    """Granularity from a command-line spec.

    ``task`` | ``layer`` (alias ``tensor``) | ``group:REGEX[;REGEX...]``.
    """
    if isinstance(spec, Granularity):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "task" and not rest:
        return TaskWise()
    if kind in ("layer", "tensor") and not rest:
        return TensorWise()
    if kind == "group" and rest:
        return GroupWise(rest.split(";"))
    raise AdamergeError(f"granularity {spec!r}: expected 'task', 'layer' (or 'tensor'), or 'group:REGEX[;REGEX...]'")
