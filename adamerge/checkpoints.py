"""Reading and writing plain state-dict files (``.pt/.pth/.bin/.ckpt`` and ``.safetensors``).

Reading never executes pickled code (``torch.load(weights_only=True)``); common wrappings are
undone: a ``state_dict`` / ``model`` / ``module`` entry holding the tensors, and a ``module.``
prefix on every key (DataParallel). Writing is atomic: a temporary file in the same folder, then
``os.replace``.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from adamerge.errors import CheckpointError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


def load_state_dict(path: str | Path, check_finite: bool = True) -> StateDict:
    """Read a state dict from ``path`` onto the CPU.

    Args:
        path: a ``.safetensors`` file, or a torch file holding a state dict (possibly wrapped in a
            ``{"state_dict": ...}`` checkpoint or with ``module.`` prefixes).
        check_finite: refuse floating-point tensors holding NaN or Inf.

    Returns:
        An ordered ``{name: tensor}`` mapping.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, holds no tensors, or holds NaN/Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path)
    else:
        state = _load_torch(path)
    state = _unwrap(state, path)
    if check_finite:
        check_finite_tensors(state, str(path))
    return state


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def _load_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise CheckpointError(f"{path} is not a torch checkpoint (corrupt or another format): {_first_line(error)}") from None
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors (a whole pickled module?); "
            f"save it with torch.save(model.state_dict(), ...) instead"
        ) from None
    except Exception as error:  # torch surfaces many kinds (RuntimeError, EOFError, IndexError, ...)
        raise CheckpointError(f"{path} is not a torch checkpoint (corrupt or another format): {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unwrap(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (keys: {', '.join(list(map(str, obj))[:5])})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def check_finite_tensors(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first floating tensor holding NaN or Inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN/Inf value(s)")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` atomically; the suffix picks the format (``.safetensors`` or torch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
