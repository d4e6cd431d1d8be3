"""Expert sources: each turns user references into an :class:`ExpertSet` (base model, task
vectors, per-task heads)."""

from adamerge.experts.base import ExpertSet
from adamerge.experts.file import load_file_experts, parse_base_spec

__all__ = ["ExpertSet", "load_file_experts", "parse_base_spec"]
