"""Build an (untrained) architecture from a spec string, never downloading weights.

Specs:

- ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None)``;
- ``open_clip:NAME`` — the image tower (``.visual``) of ``open_clip.create_model(NAME)``;
- ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False)`` (timm comes with open_clip);
- ``package.module:factory`` — any importable callable returning an ``nn.Module``.

Keyword arguments for the constructor come separately (``kwargs``), e.g. ``{"num_classes": 10}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from adamerge.errors import ArchitectureError


def build_architecture(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate the architecture named by ``spec`` with random weights.

    Args:
        spec: ``torchvision:NAME``, ``open_clip:NAME``, ``timm:NAME`` or ``package.module:factory``.
        kwargs: keyword arguments for the constructor.

    Raises:
        ArchitectureError: the spec has no ``:``, the library does not know the name, the
            constructor refuses ``kwargs``, or the factory does not return an ``nn.Module``.
    """
    kwargs = dict(kwargs or {})
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise ArchitectureError(
            f"architecture {spec!r}: expected 'torchvision:NAME', 'open_clip:NAME', 'timm:NAME' or 'package.module:factory'"
        )
    build = {"torchvision": _torchvision, "open_clip": _open_clip, "timm": _timm}.get(prefix)
    try:
        model = build(name, kwargs) if build is not None else _import_path(prefix, name, kwargs)
    except TypeError as error:  # an unknown or ill-typed constructor keyword (--base-kwargs)
        if not kwargs:
            raise
        raise ArchitectureError(
            f"--base-kwargs {kwargs}: the constructor of {spec!r} does not accept them ({_first_line(error)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise ArchitectureError(
            f"architecture 'torchvision:{name}': torchvision has no model {name!r} (e.g. {', '.join(sorted(available)[:8])}, ...)"
        )
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _open_clip(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import open_clip

    available = open_clip.list_models()
    if name not in available:
        raise ArchitectureError(
            f"architecture 'open_clip:{name}': open_clip has no model config {name!r} (e.g. {', '.join(sorted(available)[:8])}, ...)"
        )
    return open_clip.create_model(name, pretrained=None, **kwargs).visual


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ArchitectureError(f"architecture 'timm:{name}': timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise ArchitectureError(f"architecture 'timm:{name}': timm has no model {name!r} (e.g. {', '.join(timm.list_models()[:8])}, ...)")
    return timm.create_model(name, pretrained=False, **kwargs)


def _import_path(module_name: str, attribute: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ArchitectureError(f"architecture '{module_name}:{attribute}': cannot import {module_name!r} ({error})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ArchitectureError(f"architecture '{module_name}:{attribute}': {module_name} has no callable {attribute!r}")
    return factory(**kwargs)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
