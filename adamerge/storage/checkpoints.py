"""Reading and writing plain state-dict files (``.pt/.pth/.bin/.ckpt`` and ``.safetensors``).

Reading never executes pickled code (``torch.load(weights_only=True)``) unless the caller trusts
the file (``trust_pickles``, ``--trust-pickles true``): then a file holding a whole pickled
``nn.Module`` (``torch.save(model)``), or a checkpoint dict wrapping one, is unpickled and its
``state_dict()`` taken. Common wrappings are undone: a ``state_dict`` / ``model`` / ``module``
entry holding the tensors, and a ``module.`` prefix on every key (DataParallel). Writing is
atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from adamerge.errors import CheckpointError
from adamerge.storage.output_folder import umask_mode

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


def load_state_dict(path: str | Path, check_finite: bool = True, trust_pickles: bool = False) -> StateDict:
    """Read a state dict from ``path`` onto the CPU.

    Args:
        path: a ``.safetensors`` file, or a torch file holding a state dict (possibly wrapped in a
            ``{"state_dict": ...}`` checkpoint or with ``module.`` prefixes).
        check_finite: refuse floating-point tensors holding NaN or Inf.
        trust_pickles: also accept a torch file holding pickled Python objects (a whole
            ``nn.Module``, or a dict wrapping one), read with ``weights_only=False``: unpickling
            runs code named by the file, so only for files of trusted origin (a warning says so).

    Returns:
        An ordered ``{name: tensor}`` mapping.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, holds no tensors, or holds NaN/Inf;
            holds pickled objects and ``trust_pickles`` is off; or (trusted) cannot be unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path)
    else:
        state = _load_torch(path, trust_pickles)
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


def _load_torch(path: Path, trust_pickles: bool = False) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "Unsupported global" not in text:  # not a refused Python object: a corrupt file
            raise CheckpointError(f"{path} is not a torch checkpoint (corrupt or another format): {_first_line(error)}") from None
        if not trust_pickles:  # our words: torch's own message advises weights_only=False
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f"a {found.group(1)}" if found else "objects beyond tensors"
            raise CheckpointError(
                f"{path} holds pickled Python objects ({what}: a whole module?); loading it would run code "
                f"from the file: pass --trust-pickles true if you trust its origin, or re-save it with "
                f"torch.save(model.state_dict(), ...)"
            ) from None
    except Exception as error:  # torch surfaces many kinds (RuntimeError, EOFError, IndexError, ...)
        raise CheckpointError(f"{path} is not a torch checkpoint (corrupt or another format): {_first_line(error)}") from None
    return _unpickle(path)


def _unpickle(path: Path) -> object:
    """The trusted full unpickling of ``path`` (``weights_only=False``), naming what it lacks."""
    logger.warning("%s holds pickled Python objects: unpickling it runs code from the file (--trust-pickles)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise CheckpointError(
            f"{path} is a pickle whose classes cannot be found in this installation ({_first_line(error)}): "
            f"load it where the code that saved it is importable and re-save it with "
            f"torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch and pickle surface many kinds
        raise CheckpointError(f"cannot unpickle {path}: {type(error).__name__}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unwrap(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping):  # a training checkpoint holding the (trusted, unpickled) module
        modules = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), nn.Module)]
        obj = modules[0] if modules else obj
    if isinstance(obj, nn.Module):
        logger.info("%s: took the state_dict() of the pickled %s", path, type(obj).__name__)
        obj = obj.state_dict()
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
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
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
        os.chmod(tmp, umask_mode(0o666))  # temporary files are created 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
