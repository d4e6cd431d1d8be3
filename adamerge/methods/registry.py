"""The method registry: names to :class:`~adamerge.methods.method.Method` objects.

Three ways a ``--method`` name is found, in order:

1. a registered method (the built-in ones, :mod:`adamerge.methods.builtin`, and any registered
   with :func:`register_method`);
2. ``package.module:ATTRIBUTE``: an importable :class:`Method` instance (or a zero-argument
   callable returning one), so a method written outside adamerge runs from the shell;
3. an installed package's entry point in the group ``adamerge.methods`` with that name.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from adamerge.errors import AdamergeError
from adamerge.methods.method import Method

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adamerge.methods"
_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available as ``--method NAME``; returns it (usable as a one-line registration).

    Raises:
        AdamergeError: not a :class:`Method`, or its name is taken (unless ``replace``).
    """
    if not isinstance(method, Method):
        raise AdamergeError(f"register_method: expected a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise AdamergeError(f"method {method.name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[method.name] = method
    return method


def method_names(learned: bool | None = None) -> list[str]:
    """Registered names in registration order (``learned``: only learned or only static ones)."""
    return [name for name, m in _REGISTRY.items() if learned is None or m.learned == learned]


def get_method(name: str, learned: bool | None = None, option: str = "--method") -> Method:
    """The method called ``name`` (see the module docstring for where it is looked up).

    Args:
        name: registered name, ``package.module:ATTRIBUTE`` or an entry-point name.
        learned: refuse a static method (``True``) or a learned one (``False``).
        option: the option that named it, for the error messages.

    Raises:
        AdamergeError: nothing of that name, or the wrong kind, with the valid names.
    """
    method = _REGISTRY.get(name) or _from_import_path(name) or _from_entry_point(name)
    command = {True: "adamerge fit", False: "adamerge merge", None: "adamerge"}[learned]
    if method is None:
        raise AdamergeError(
            f"{option} {name!r}: expected one of {', '.join(method_names(learned))}, or package.module:ATTRIBUTE of a Method"
        )
    if learned is not None and method.learned != learned:
        other = "adamerge merge" if method.learned is False else "adamerge fit"
        raise AdamergeError(
            f"{option} {name!r} is a {'learned' if method.learned else 'static'} method: run it with {other}, not {command}"
        )
    return method


def _from_import_path(name: str) -> Method | None:
    if ":" not in name:
        return None
    module_name, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise AdamergeError(f"--method {name!r}: cannot import {attribute!r} from {module_name!r} ({error})") from None
    method = found() if callable(found) and not isinstance(found, Method) else found
    if not isinstance(method, Method):
        raise AdamergeError(f"--method {name!r}: expected a Method, got {type(method).__name__}")
    return method


def _from_entry_point(name: str) -> Method | None:
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            method = point.load()
            method = method() if callable(method) and not isinstance(method, Method) else method
            if isinstance(method, Method):
                logger.debug("method %s from entry point %s", name, point.value)
                return method
    return None
