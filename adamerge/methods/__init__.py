"""Merging methods as objects, and their registry (:mod:`adamerge.methods.registry`).

Write a method by subclassing (or instantiating) :class:`LearnedMethod` or :class:`StaticMethod`
and register it in one line::

    from adamerge.methods import LearnedMethod, register_method
    register_method(LearnedMethod("my-adamerging", "my paper", init=0.5, lr=3e-3))

or pass ``--method package.module:ATTRIBUTE`` without registering anything.
"""

from adamerge.methods import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from adamerge.methods.expert_merging import ChunkRefinedMethod
from adamerge.methods.learned import FEW_SHOT_INIT, FEW_SHOT_LR, OBJECTIVES, LearnedMethod
from adamerge.methods.method import Method
from adamerge.methods.registry import ENTRY_POINT_GROUP, get_method, method_names, register_method
from adamerge.methods.static_method import StaticMethod

__all__ = [
    "ENTRY_POINT_GROUP",
    "FEW_SHOT_INIT",
    "FEW_SHOT_LR",
    "OBJECTIVES",
    "ChunkRefinedMethod",
    "LearnedMethod",
    "Method",
    "StaticMethod",
    "get_method",
    "method_names",
    "register_method",
]
