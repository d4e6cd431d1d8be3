"""Experts from open_clip: ``--base open_clip:ARCH@FILE`` with zero-shot heads per task.

The merged object is CLIP's image tower (``visual``); every task classifies with a zero-shot head
built from its class names by the base's text tower (never merged). The model that runs is a
:class:`ZeroShotClassifier`::

    logits = logit_scale · normalize(visual(x)) @ head.weightᵀ      head.weight: (C_task, D), unit rows

so ``head.weight`` is the only per-task tensor and ``logit_scale`` (the base CLIP's
``logit_scale.exp()``) is shared.

Inputs:

- ``FILE``: a full CLIP state dict, what ``open_clip.create_model(ARCH, pretrained=FILE)`` loads
  (the keys of ``open_clip.create_model(ARCH).state_dict()``). A file holding only the image tower
  (no ``visual.`` keys) keeps its older meaning: the image tower over plain state-dict experts
  (:mod:`adamerge.sources.file`, ``--head-pattern`` for their heads).
- each expert: a full CLIP state dict (only ``visual.*`` is used), an image-tower state dict (with
  or without the ``visual.`` prefix), or, with ``--trust-pickles``, a whole pickled module as the
  task-vectors / AdaMerging code saves it (``torch.save(image_encoder)``: a wrapper whose ``.model``
  is a CLIP, a CLIP, or a visual tower). Unpickling needs the classes the file names: the original
  repository's modules on ``PYTHONPATH`` and an open_clip version that still has its classes.
- class names per task, one per line, in the order of the task's labels (for ``--eval``: the sorted
  class folder names), read from the first file found of::

      CALIB/<task>/classnames.txt    CALIB/<task>.classnames.txt
      EVAL/<task>/classnames.txt     EVAL/<task>.classnames.txt

  and optional prompt templates from ``templates.txt`` / ``<task>.templates.txt`` at the same
  places (one per line, ``{c}`` marks the class name; default: open_clip's
  ``SIMPLE_IMAGENET_TEMPLATES``).

Export (:func:`write_open_clip_model`): ``open_clip_model.safetensors`` — the base's full CLIP
state dict with ``visual.*`` replaced by the merge, loadable without adamerge by
``open_clip.create_model(ARCH, pretrained=".../open_clip_model.safetensors")`` (or
``create_model("local-dir:OUT")`` thanks to ``open_clip_config.json``) — plus ``heads/<task>.pt``
(``{"weight", "logit_scale", "classnames", "templates"}``, readable with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adamerge.core.task_vectors import TaskVectors, check_expert_keys
from adamerge.data.image_preprocessing import open_clip_metadata
from adamerge.errors import AdamergeError, ArchitectureError, CheckpointError, DataError, IncompatibleExpertError
from adamerge.sources.base import ExpertSet, SourceOptions
from adamerge.sources.file import check_state_fits, load_file_experts, parse_base_spec
from adamerge.storage.checkpoints import check_finite_tensors, load_state_dict, save_state_dict
from adamerge.storage.files import write_json
from adamerge.storage.output_folder import inside, umask_mode

logger = logging.getLogger(__name__)

PREFIX = "open_clip:"
MERGED_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
TOWER = "visual."
StateDict = dict[str, torch.Tensor]


class ZeroShotClassifier(nn.Module):
    """CLIP's image tower followed by a zero-shot head.

    ``forward(images) = logit_scale · normalize(visual(images)) @ head.weightᵀ``; with unit-norm
    class embeddings as ``head.weight`` this is open_clip's zero-shot classification.

    Args:
        visual: the image tower (``CLIP.visual``), images ``(B, 3, S, S)`` -> features ``(B, D)``.
        head_weight: ``(C, D)`` class embeddings (rows unit-norm).
        logit_scale: the temperature ``CLIP.logit_scale.exp()`` (a float or a scalar tensor).
    """

    def __init__(self, visual: nn.Module, head_weight: torch.Tensor, logit_scale: float | torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        num_classes, dim = head_weight.shape
        self.head = nn.Linear(dim, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.visual(images), dim=-1)  # (B, D)
        return self.logit_scale * self.head(features)  # (B, C)


@dataclass
class ZeroShotHead:
    """One task's zero-shot head and where its class names came from.

    Attributes:
        weight: ``(C, D)`` unit-norm class embeddings of the base text tower.
        classnames: the C class names, label order.
        templates: prompt templates (``{c}`` marks the class name).
        classnames_file: the file the names were read from.
        templates_file: the templates file, ``None`` for open_clip's simple ImageNet templates.
    """

    weight: torch.Tensor
    classnames: list[str]
    templates: list[str]
    classnames_file: Path
    templates_file: Path | None


def load_open_clip_experts(base: str, experts: Mapping[str, str], options: SourceOptions) -> ExpertSet:
    """The :class:`ExpertSet` of ``--base open_clip:ARCH@FILE`` (see the module docstring).

    Args:
        base: ``open_clip:ARCH@FILE`` with FILE a full CLIP state dict (an image-tower-only file
            falls back to :func:`adamerge.sources.file.load_file_experts`).
        experts: ``{task: file}``: CLIP / image-tower state dicts or (``options.trust_pickles``)
            pickled modules.
        options: ``calib`` / ``eval`` (where the class names are), ``trust_pickles``, ``dtype``,
            ``batchnorm`` (``merge`` also merges float buffers of the tower), ``base_kwargs``
            (keyword arguments of ``open_clip.create_model``).

    Raises:
        AdamergeError: unknown architecture, unreadable or mismatched files, pickles without
            ``trust_pickles``, missing / empty / miscounted class-name files.
    """
    import open_clip

    if not experts:
        raise AdamergeError("no experts given: pass --experts NAME=PATH [NAME=PATH ...]")
    spec, path = parse_base_spec(base)
    arch = spec[len(PREFIX) :]
    if arch not in open_clip.list_models():
        raise ArchitectureError(
            f"architecture '{spec}': open_clip has no model config {arch!r} (e.g. {', '.join(sorted(open_clip.list_models())[:8])}, ...)"
        )
    state = read_checkpoint(path, options.trust_pickles, "base")
    kind = _clip_layout(state)
    if kind == "tower":
        logger.info("base %s holds an image tower only: plain state-dict experts over open_clip:%s.visual", path, arch)
        del state
        return load_file_experts(
            spec, path, experts, head_pattern=options.head_pattern, batchnorm=options.batchnorm,
            dtype=options.dtype, arch_kwargs=options.base_kwargs, trust_pickles=options.trust_pickles,
        )  # fmt: skip
    if options.head_pattern:
        logger.warning("--head-pattern %r is ignored: open_clip experts use zero-shot heads", options.head_pattern)
    clip = _create_clip(arch, options.base_kwargs)
    _load_clip_state(clip, _strip(state, "model.") if kind == "encoder" else state, path)
    del state
    clip.eval()
    heads = build_zero_shot_heads(clip, arch, list(experts), options.calib, options.eval)

    visual = clip.visual
    base_tower = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    base_rest = {k: v.detach().clone() for k, v in clip.state_dict().items() if not k.startswith(TOWER)}
    logit_scale = float(clip.logit_scale.detach().exp())
    first = next(iter(heads.values()))
    model = ZeroShotClassifier(visual, first.weight, logit_scale)
    names = [TOWER + n for n, p in visual.named_parameters() if p.is_floating_point()]
    if options.batchnorm == "merge":
        names += [TOWER + n for n, b in visual.named_buffers() if b.is_floating_point()]
    base_state = {TOWER + k: v for k, v in base_tower.items()}
    paths = {task: Path(file) for task, file in experts.items()}

    def tower_of(task: str) -> StateDict:
        return read_expert_tower(task, paths[task], base_tower, base_rest, options.trust_pickles)

    def reader(task: str) -> Callable[[], StateDict]:
        return lambda: {TOWER + k: v for k, v in tower_of(task).items()}

    task_vectors = TaskVectors.from_states(base_state, {task: reader(task) for task in experts}, names, options.dtype)
    logger.info("task vectors: %s", task_vectors.extra_repr())

    def expert_model(task: str) -> nn.Module:
        tower = copy.deepcopy(visual)
        tower.load_state_dict(tower_of(task), strict=True)
        return ZeroShotClassifier(tower, heads[task].weight, logit_scale)

    preprocess = dict(open_clip.get_model_preprocess_cfg(clip))
    config = {"model_cfg": _model_config(arch, options.base_kwargs), "preprocess_cfg": preprocess}
    del clip  # the text tower is no longer needed: heads are built, its tensors kept for export
    return ExpertSet(
        model,
        task_vectors,
        heads={task: {"head.weight": head.weight} for task, head in heads.items()},
        sources={
            "base": f"{spec}@{path.resolve()}",
            "experts": {task: str(p.resolve()) for task, p in paths.items()},
            "classnames": {task: str(h.classnames_file.resolve()) for task, h in heads.items()},
            "templates": {
                task: str(h.templates_file.resolve()) if h.templates_file else "open_clip.SIMPLE_IMAGENET_TEMPLATES"
                for task, h in heads.items()
            },
        },
        modality="image",
        expert_model=expert_model,
        export=lambda directory, merged, task_heads: write_open_clip_model(
            directory, merged, task_heads, base_rest, config, heads, logit_scale
        ),
        image_transform=open_clip_transform(preprocess),
        image_preprocessing=open_clip_metadata(preprocess, f"open_clip's preprocess_cfg of {spec}"),
    )


# --------------------------------------------------------------------------------------------
# reading checkpoints


def read_checkpoint(path: str | Path, trust_pickles: bool, what: str) -> StateDict:
    """A state dict from ``path``: a plain state-dict file, or a pickled module / object (only
    with ``trust_pickles``: unpickling runs code named by the file).

    Args:
        path: the file.
        trust_pickles: allow whole pickled objects (e.g. ``torch.save(image_encoder)``).
        what: how the file is named in errors (``base``, ``expert 'mnist'``).

    Raises:
        CheckpointError: unreadable file; a pickle without ``trust_pickles``; a pickle whose classes
            cannot be imported (naming the missing module or class).
    """
    path = Path(path)
    try:
        return load_state_dict(path)
    except CheckpointError as error:
        if not _is_pickled_object(path):
            raise CheckpointError(f"{what}: {error}") from None
    if not trust_pickles:
        raise CheckpointError(
            f"{what}: {path} is a pickled Python object (a whole module, as the task-vectors / AdaMerging "
            f"code saves with torch.save(model)); loading it runs code from the file: pass --trust-pickles "
            f"if you trust its origin, or save model.state_dict() instead"
        )
    obj = _unpickle(path, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]  # a training checkpoint holding the module
    if isinstance(obj, nn.Module):
        state = {k: v for k, v in obj.state_dict().items() if isinstance(v, torch.Tensor)}
    elif isinstance(obj, Mapping):
        wrapped = [obj[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), Mapping)]
        state = {str(k): v for k, v in (wrapped[0] if wrapped else obj).items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointError(f"{what}: {path} unpickles to a {type(obj).__name__}, expected a module or a state dict")
    if not state:
        raise CheckpointError(f"{what}: {path} holds no tensors")
    check_finite_tensors(state, f"{what} ({path})")
    logger.info("%s: read the pickled %s in %s", what, type(obj).__name__, path)
    return state


def _is_pickled_object(path: Path) -> bool:
    """Whether ``path`` is a torch file that only a full unpickling reads (it names classes)."""
    if path.suffix == ".safetensors" or not path.is_file():
        return False
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        return "Unsupported global" in str(error) or "Weights only load failed" in str(error)
    except Exception:  # noqa: BLE001 - anything else: not a readable torch pickle at all
        return False
    return False


def _unpickle(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        module = error.name or str(error)
        raise CheckpointError(
            f"{what}: {path} is a pickled module whose classes live in the module {module!r}, which cannot be "
            f"imported: put the code that saved it on PYTHONPATH (for the task-vectors / AdaMerging checkpoints, "
            f"the repository root holding 'src/modeling.py'), or re-save it as a state dict there "
            f"(torch.save(obj.state_dict(), ...))"
        ) from None
    except AttributeError as error:
        match = re.search(r"attribute '([^']+)' on <module '([^']+)'", str(error))
        name, module = match.groups() if match else ("?", "?")
        hint = (
            "an older open_clip (the version the file was saved with)"
            if module.split(".")[0] == "open_clip"
            else f"the version of {module.split('.')[0]!r} the file was saved with"
        )
        raise CheckpointError(
            f"{what}: {path} needs the class {name!r} from module {module!r}, which this installation lacks: "
            f"load it with {hint} and re-save it as a state dict (torch.save(obj.state_dict(), ...))"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch and pickle surface many kinds
        raise CheckpointError(f"{what}: cannot unpickle {path}: {type(error).__name__}: {error}") from None


def open_clip_transform(preprocess: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """open_clip's evaluation preprocessing for a model's ``preprocess_cfg`` (size, mean, std,
    interpolation, resize mode), as ``create_model_and_transforms`` returns it."""
    import open_clip

    return open_clip.image_transform(
        preprocess["size"],
        is_train=False,
        mean=preprocess.get("mean"),
        std=preprocess.get("std"),
        resize_mode=preprocess.get("resize_mode"),
        interpolation=preprocess.get("interpolation"),
        fill_color=preprocess.get("fill_color", 0),
    )


def _model_config(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture's open_clip config with the constructor keyword arguments of ``kwargs``
    (not ``create_model``'s own options such as ``force_image_size``) applied."""
    import inspect

    import open_clip

    own = set(inspect.signature(open_clip.create_model).parameters)
    return {**open_clip.get_model_config(arch), **{k: v for k, v in kwargs.items() if k not in own}}


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _clip_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``clip`` (full CLIP keys), ``encoder`` (a wrapper's ``model.`` + CLIP keys) or ``tower``."""
    if any(k.startswith(TOWER) for k in state):
        return "clip"
    if any(k.startswith("model." + TOWER) for k in state):
        return "encoder"
    return "tower"


def _create_clip(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import open_clip

    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip warns on the root logger; the weights come next
    try:
        return open_clip.create_model(arch, pretrained=None, **dict(kwargs))
    except Exception as error:  # noqa: BLE001 - constructor errors of any kind
        raise ArchitectureError(f"open_clip:{arch} cannot be built with {dict(kwargs)}: {error}") from None
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _load_clip_state(clip: nn.Module, state: StateDict, path: Path) -> None:
    """Load a full CLIP state dict (strict), naming missing / unexpected keys and shapes."""
    expected = clip.state_dict()
    state = dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing and all(k.startswith("transformer.") for k in missing) and not extra:
        raise CheckpointError(
            f"base {path} lacks the text transformer ({len(missing)} tensors, e.g. {missing[:2]}), as the "
            f"task-vectors ImageEncoder saves it; zero-shot heads need the full CLIP: pass the open_clip "
            f"checkpoint (open_clip.create_model(ARCH, pretrained=...).state_dict())"
        )
    check_state_fits(expected, state, f"base {path}", f"does not fit open_clip CLIP {type(clip).__name__}")
    clip.load_state_dict(state, strict=True)


def tower_prefix(keys: Sequence[str], tower_keys: Sequence[str]) -> str | None:
    """The key prefix under which ``keys`` hold the image tower (``""``, ``visual.``,
    ``model.visual.``, ...): the one matching the most tower tensor names; ``None`` if none."""
    counts: dict[str, int] = {}
    for key in keys:
        for name in tower_keys:
            if key == name or key.endswith("." + name):
                prefix = key[: len(key) - len(name)]
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda p: (counts[p], p.endswith(TOWER)))


def read_expert_tower(
    task: str,
    path: Path,
    base_tower: Mapping[str, torch.Tensor],
    base_rest: Mapping[str, torch.Tensor],
    trust_pickles: bool,
) -> StateDict:
    """The image-tower state dict of one expert file (any supported layout), checked against the
    base tower's names and shapes.

    Raises:
        CheckpointError: unreadable file or refused pickle.
        IncompatibleExpertError: the file holds no image tower of the base's architecture.
    """
    what = f"expert {task!r}"
    state = read_checkpoint(path, trust_pickles, what)
    prefix = tower_prefix(list(state), list(base_tower))
    if prefix is None:
        raise IncompatibleExpertError(
            f"{what} ({path}) holds no image tower of the base architecture: none of its tensors is named "
            f"like the base's (e.g. {list(base_tower)[:3]}; the file has e.g. {list(state)[:3]})"
        )
    tower = _strip(state, prefix) if prefix else dict(state)
    check_expert_keys(base_tower, tower, f"{task} ({path})", [])
    if prefix.endswith(TOWER):
        _warn_if_text_differs(task, path, _strip(state, prefix[: -len(TOWER)]), base_rest)
    return tower


def _warn_if_text_differs(task: str, path: Path, rest: Mapping[str, torch.Tensor], base_rest: Mapping[str, torch.Tensor]) -> None:
    """A fine-tuned CLIP whose non-image tensors differ from the base's was likely fine-tuned from
    another pretrained model (or its text tower was trained): say so, heads use the base's."""
    differing = [
        k for k, v in rest.items()
        if not k.startswith(TOWER) and k in base_rest and v.shape == base_rest[k].shape
        and not torch.allclose(v.float(), base_rest[k].float(), rtol=1e-4, atol=1e-6)
    ]  # fmt: skip
    if differing:
        logger.warning(
            "expert %r (%s): %d non-image tensor(s) differ from the base's (e.g. %s): was it fine-tuned from "
            "another pretrained CLIP? Only its image tower is used; zero-shot heads come from the base text tower",
            task, path, len(differing), differing[:2],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# zero-shot heads


def find_task_file(task: str, filename: str, roots: Sequence[Path | None]) -> Path | None:
    """The first of ``ROOT/<task>/<filename>`` and ``ROOT/<task>.<filename>`` that exists, over ``roots``."""
    for root in roots:
        if root is None:
            continue
        for candidate in (Path(root) / task / filename, Path(root) / f"{task}.{filename}"):
            if candidate.is_file():
                return candidate
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_classnames(task: str, calib: Path | None, eval_dir: Path | None) -> tuple[list[str], Path]:
    """Class names of ``task`` (label order) and their file; checked against the labelled
    evaluation folder's classes when there is one.

    Raises:
        DataError: no file, an empty file, repeated names, a count (or an order of the folder names)
            that differs from ``EVAL/<task>``'s classes.
    """
    roots = [calib, eval_dir]
    path = find_task_file(task, CLASSNAMES_FILE, roots)
    if path is None:
        places = [str(Path(r) / task / CLASSNAMES_FILE) for r in roots if r] + [
            str(Path(r) / f"{task}.{CLASSNAMES_FILE}") for r in roots if r
        ]
        raise DataError(
            f"task {task!r}: no class names for its zero-shot head: write one class name per line (label order) "
            f"to {' or '.join(places) or f'CALIB/{task}/{CLASSNAMES_FILE} (pass --calib)'}"
        )
    names = _read_lines(path)
    if not names:
        raise DataError(f"task {task!r}: class-name file {path} is empty (expected one class name per line)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"task {task!r}: class-name file {path} repeats {repeated[:3]}")
    if eval_dir is not None and (Path(eval_dir) / task).is_dir():
        folders = sorted(p.name for p in (Path(eval_dir) / task).iterdir() if p.is_dir())
        if folders and len(folders) != len(names):
            raise DataError(
                f"task {task!r}: class-name file {path} lists {len(names)} classes, the evaluation folder "
                f"{Path(eval_dir) / task} has {len(folders)} class folders"
            )
        if folders and set(folders) == set(names) and folders != names:
            raise DataError(
                f"task {task!r}: class-name file {path} lists the evaluation folder's classes in another order; "
                f"labels follow the sorted folder names ({folders[:4]}...)"
            )
    return names, path


def read_templates(task: str, calib: Path | None, eval_dir: Path | None) -> tuple[list[str], Path | None]:
    """Prompt templates of ``task`` (``{c}`` marks the class name) and their file, or open_clip's
    ``SIMPLE_IMAGENET_TEMPLATES`` (as ``{c}`` strings) and ``None`` when there is no file."""
    import open_clip

    path = find_task_file(task, TEMPLATES_FILE, [calib, eval_dir])
    if path is None:
        return [t("{c}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES], None
    templates = _read_lines(path)
    if not templates:
        raise DataError(f"task {task!r}: template file {path} is empty (expected one template per line, with {{c}})")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DataError(f"task {task!r}: template(s) {bad[:2]} in {path} lack the class-name placeholder {{c}}")
    return templates, path


def build_zero_shot_heads(
    clip: nn.Module, arch: str, tasks: Sequence[str], calib: Path | None, eval_dir: Path | None
) -> dict[str, ZeroShotHead]:
    """One zero-shot head per task from the base text tower
    (``open_clip.build_zero_shot_classifier`` with ``open_clip.get_tokenizer(arch)``).

    Raises:
        DataError: see :func:`read_classnames` / :func:`read_templates`.
        ArchitectureError: the architecture's tokenizer cannot be built offline.
    """
    import open_clip

    read = {task: (read_classnames(task, calib, eval_dir), read_templates(task, calib, eval_dir)) for task in tasks}
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as error:  # noqa: BLE001 - HF tokenizers may try to download
        raise ArchitectureError(f"open_clip:{arch}: its tokenizer cannot be loaded (offline?): {error}") from None
    heads = {}
    device = next(clip.parameters()).device
    for task, ((names, names_file), (templates, templates_file)) in read.items():
        prompts = [lambda c, t=t: t.replace("{c}", c) for t in templates]
        with torch.no_grad():
            weight = open_clip.build_zero_shot_classifier(
                clip, tokenizer=tokenizer, classnames=names, templates=prompts, device=device
            )  # (D, C)
        heads[task] = ZeroShotHead(weight.T.contiguous().float().cpu(), names, templates, names_file, templates_file)
        logger.info("zero-shot head of %r: %d classes from %s, %d template(s)", task, len(names), names_file, len(templates))
    return heads


# --------------------------------------------------------------------------------------------
# export


def write_open_clip_model(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    task_heads: Mapping[str, Mapping[str, torch.Tensor]],
    base_rest: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    heads: Mapping[str, ZeroShotHead],
    logit_scale: float,
) -> dict[str, str]:
    """Write the merged model in open_clip's own format.

    Args:
        directory: the output folder.
        state: the merged :class:`ZeroShotClassifier` state dict (``visual.*``, ``head.weight``, ...).
        task_heads: ``{task: {"head.weight": (C, D)}}``, plus the task's ``visual.*`` BatchNorm
            statistics under ``--batchnorm per-task`` (saved as the payload's ``"state"``, to load
            over the merged file: ``clip.load_state_dict(merged | payload["state"])``).
        base_rest: the base CLIP's tensors outside ``visual.*`` (text tower, ``logit_scale``, ...).
        config: ``{"model_cfg", "preprocess_cfg"}`` for ``open_clip_config.json``.
        heads: the zero-shot heads (class names and templates).
        logit_scale: the base's ``logit_scale.exp()``.

    Returns:
        ``{what: file}`` relative to ``directory``.
    """
    clip_state = dict(base_rest)
    clip_state.update({k: v for k, v in state.items() if k.startswith(TOWER)})
    files = {"merged": save_state_dict(clip_state, Path(directory) / MERGED_FILE).name}
    write_json(Path(directory) / CONFIG_FILE, _plain(config))
    files["config"] = CONFIG_FILE
    for task, tensors in task_heads.items():
        payload = {
            "weight": tensors["head.weight"].detach().cpu().contiguous(),  # (C, D)
            "logit_scale": torch.tensor(logit_scale),
            "classnames": list(heads[task].classnames),
            "templates": list(heads[task].templates),
        }
        statistics = {k: v.detach().cpu() for k, v in tensors.items() if k.startswith(TOWER)}
        if statistics:
            payload["state"] = statistics
        _atomic_torch_save(payload, inside(Path(directory), "heads", f"{task}.pt"))
        files[f"head/{task}"] = f"heads/{task}.pt"
    return files


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _atomic_torch_save(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (as
    :func:`adamerge.storage.checkpoints.save_state_dict`, for payloads that also hold strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        tmp = Path(handle.name)
    try:
        torch.save(dict(payload), tmp)
        os.chmod(tmp, umask_mode(0o666))  # temporary files are created 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
