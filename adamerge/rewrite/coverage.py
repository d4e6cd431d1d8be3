"""A warning when a structured merge applies its own rule to few of the merged entries.

TSV-M, Iso-C / Iso-CTS decompose 2-D weight matrices and RegMean solves linear layers; every other
tensor they average. On a model whose merged weights are mostly something else (a convolutional
network's 4-D kernels, for instance) such a merge is close to plain averaging, which a user should
hear about rather than find out from the accuracy table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

#: Below this share of the merged entries under the method's own rule, the run is warned.
MIN_COVERED_SHARE = 0.5


def warn_if_mostly_averaged(
    method: str, items: Sequence[tuple[str, torch.Tensor]], covered: Callable[[str, torch.Tensor], bool], what: str, hint: str = ""
) -> float:
    """Warn when less than :data:`MIN_COVERED_SHARE` of the entries are ``covered``.

    Args:
        method: the merge's name, for the message.
        items: ``(name, Tensor(K, *shape))`` of every merged tensor.
        covered: whether a tensor gets the method's own rule (the rest are averaged).
        what: what a covered tensor is, for the message (``"2-D matrices"``).
        hint: what would cover more, appended to the message.

    Returns:
        The covered share of the entries per task (0 for an empty model).
    """
    total = sum(x[0].numel() for _, x in items)
    hits = [(name, x[0].numel()) for name, x in items if covered(name, x)]
    share = sum(n for _, n in hits) / total if total else 0.0
    if share < MIN_COVERED_SHARE:
        logger.warning(
            "%s: only %.1f %% of the merged entries (%d of %d tensors) are %s; the rest are averaged, "
            "so on this model the merge is close to --method average%s",
            method, 100 * share, len(hits), len(items), what, f" ({hint})" if hint else "",
        )  # fmt: skip
    return share
