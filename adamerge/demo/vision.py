"""The real vision demo: MobileNetV2 experts fine-tuned on five small image tasks, plus the
calibration and evaluation folders a merger needs. Deterministic and cached.

For every task the rows of the source data are split once, seeded and disjoint::

    perm = numpy.random.default_rng(task_seed).permutation(rows)
    test = perm[:test_size]; calib = perm[test_size:test_size + calib_size]; finetune = the next rows

(test and calibration rows stay the same when only the fine-tuning size changes). Cache layout::

    <cache_dir>/
      manifest.json                       settings, versions, seeds, sha256 and accuracy per task
      splits.json                         the split of every task (seed, ranges, sha256 of indices)
      base.pth                            torchvision mobilenet_v2 ImageNet state dict (a copy)
      experts/<task>.pth                  fine-tuned state dict, classifier.1 is (10, 1280)
      calib/<task>/<row>.png              unlabeled calibration images
      eval/<task>/<label>_<class>/<row>.png   labelled test images; sorted folders = label order

A second call with the same settings checks the manifest (settings fingerprint, file sha256,
image counts) and rebuilds nothing; a task whose settings changed is rebuilt. A cache hit needs
neither the source data nor any training.

Run ``python -m adamerge.demo.vision --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F

from adamerge.data.images import LabelledImageFolder, build_image_transform
from adamerge.datasets.vision import VISION_TASKS, ImageArrays, load_vision_task, resolve_data_root
from adamerge.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_ENV = "ADAMERGE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/adamerge/demo-vision")
BASE_WEIGHTS = "backbones/mobilenet_v2-b0353104.pth"
DEFAULT_TASKS = ("mnist", "fashion_mnist", "cifar10", "kannada_mnist", "usps")
FEATURE_DIM = 1280  # MobileNetV2 penultimate width
SPLIT_PARTS = ("test", "calib", "finetune")  # order of the parts in the permutation


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the assets of one task (its fingerprint).

    Attributes:
        image_size: square input side of experts, calibration and evaluation.
        finetune_size: fine-tuning rows per task (capped by what the data set has left).
        calib_size: unlabeled calibration rows per task.
        test_size: labelled test rows per task.
        epochs: passes over the fine-tuning rows.
        batch_size: fine-tuning batch size.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the steps spent warming up.
        max_steps: optional cap on the optimiser steps (tests, smoke runs).
        seed: master seed; each task derives its own (see :func:`task_seed`).
    """

    image_size: int = 64
    finetune_size: int = 2000
    calib_size: int = 500
    test_size: int = 500
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_steps: int | None = None
    seed: int = 0


QUICK_SETTINGS = DemoSettings(image_size=48, finetune_size=500, calib_size=100, test_size=200, epochs=3, batch_size=32)


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a built vision demo.

    Attributes:
        root: the cache folder.
        base: the base (pretrained) state dict.
        experts: task name -> fine-tuned state dict, in the requested task order.
        calib_dir: ``<task>/<image>.png`` unlabeled calibration images.
        eval_dir: ``<task>/<class>/<image>.png`` labelled test images.
        image_size: input side the experts were trained at.
        manifest: ``manifest.json``.
        splits: ``splits.json``.
        accuracy: task name -> the expert's accuracy on its own test split.
    """

    root: Path
    base: Path
    experts: dict[str, Path]
    calib_dir: Path
    eval_dir: Path
    image_size: int
    manifest: Path
    splits: Path
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Task names in the requested order."""
        return list(self.experts)


# --------------------------------------------------------------------------- small utilities


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Hex sha256 of an array's bytes in C order (how ``splits.json`` fingerprints row indices)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _write_json_atomic(path: Path, payload: Mapping) -> None:
    _write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
        stream.write(data)
    os.replace(stream.name, path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable %s (%s)", path, error)
        return {}


def save_state_dict_atomic(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save a state dict of contiguous CPU tensors: a temporary file, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
        torch.save(plain, stream)
    os.replace(stream.name, path)


def resolve_cache_dir(cache_dir: str | Path | None = None, default: Path = DEFAULT_CACHE_DIR) -> Path:
    """The cache folder: the argument, else ``$ADAMERGE_CACHE``, else ``default`` (``~/.cache/adamerge/demo-vision``)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or default
    return Path(cache_dir).expanduser().resolve()


def versions() -> dict[str, str]:
    """Versions of the libraries the assets depend on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


# --------------------------------------------------------------------------- splits


def task_seed(seed: int, task: str) -> int:
    """The seed of one task, derived from the master seed and the task name (stable across runs)."""
    return zlib.crc32(f"{seed}:{task}".encode())


def split_indices(rows: int, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, seeded parts of ``range(rows)``: test, then calib, then finetune.

    Args:
        rows: number of rows in the data set.
        sizes: requested size of each part of :data:`SPLIT_PARTS`.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        Part name -> int64 row indices. ``test`` and ``calib`` get exactly their sizes; ``finetune``
        gets at most its size (what is left).

    Raises:
        DataError: if the data set cannot hold the test and calibration parts plus one row.
    """
    fixed = sizes["test"] + sizes["calib"]
    if fixed >= rows:
        raise DataError(f"test ({sizes['test']}) + calib ({sizes['calib']}) rows leave nothing of {rows} rows")
    perm = np.random.default_rng(seed).permutation(rows)  # (rows,)
    bounds = {"test": (0, sizes["test"]), "calib": (sizes["test"], fixed)}
    bounds["finetune"] = (fixed, min(rows, fixed + sizes["finetune"]))
    return {part: perm[start:stop].astype(np.int64) for part, (start, stop) in bounds.items()}


def describe_split(rows: int, seed: int, parts: Mapping[str, np.ndarray]) -> dict:
    """The JSON record of a split: enough to regenerate and to verify it."""
    record = {"rows": rows, "seed": seed, "recipe": "numpy.random.default_rng(seed).permutation(rows)", "parts": {}}
    start = 0
    for name in SPLIT_PARTS:
        indices = parts[name]
        record["parts"][name] = {
            "perm_range": [start, start + len(indices)],
            "size": len(indices),
            "sha256": sha256_array(indices.astype("<i8")),
        }
        start += len(indices)
    return record


# --------------------------------------------------------------------------- image folders


def class_folder_names(classes: Sequence[str]) -> list[str]:
    """Folder names ``<label>_<class>`` that sort in label order (label zero-padded)."""
    width = max(2, len(str(len(classes) - 1)))
    return [f"{label:0{width}d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name).strip('_')}" for label, name in enumerate(classes)]


def _swap_folder(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` (both in the same parent folder)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash)
    else:
        os.replace(staging, target)


def _write_pngs(images: np.ndarray, names: Sequence[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / f"{name}.png")  # (H, W) -> 'L', (H, W, 3) -> 'RGB'


def _row_names(indices: np.ndarray, rows: int) -> list[str]:
    width = len(str(rows - 1))
    return [f"{index:0{width}d}" for index in indices]


def write_calib_folder(arrays: ImageArrays, indices: np.ndarray, target: Path) -> None:
    """Write the rows ``indices`` as unlabeled ``<row>.png`` files into ``target`` (atomically)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    _write_pngs(arrays.images[indices], _row_names(indices, len(arrays)), staging)
    _swap_folder(staging, target)


def write_eval_folder(arrays: ImageArrays, indices: np.ndarray, target: Path) -> None:
    """Write the rows ``indices`` as ``<label>_<class>/<row>.png`` into ``target`` (atomically)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    folders = class_folder_names(arrays.classes)
    names = np.array(_row_names(indices, len(arrays)))
    labels = arrays.labels[indices]  # (n,)
    for label, folder in enumerate(folders):
        chosen = labels == label
        _write_pngs(arrays.images[indices[chosen]], names[chosen], staging / folder)
    _swap_folder(staging, target)


def count_files(folder: Path) -> int:
    """Number of ``*.png`` files below ``folder`` (0 if it does not exist)."""
    return sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0


# --------------------------------------------------------------------------- models


def load_base_model(base_path: Path) -> nn.Module:
    """torchvision ``mobilenet_v2`` with the state dict at ``base_path`` (1000-class head)."""
    model = torchvision.models.mobilenet_v2()
    try:
        model.load_state_dict(torch.load(base_path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"cannot load mobilenet_v2 weights from {base_path}: {error}") from error
    return model


def build_expert_model(base_path: Path, num_classes: int, seed: int) -> nn.Module:
    """The base model with ``classifier.1`` replaced by a fresh ``nn.Linear(1280, num_classes)``.

    Args:
        base_path: base state dict.
        num_classes: classes of the task.
        seed: ``torch.manual_seed`` for the new head (and the fine-tuning after it).
    """
    model = load_base_model(base_path)
    torch.manual_seed(seed)
    model.classifier[1] = nn.Linear(FEATURE_DIM, num_classes)
    return model


def to_input_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Apply :func:`adamerge.data.images.build_image_transform` to PIL images built from uint8 arrays.

    Returns:
        (N, 3, S, S) float32, in channels-last memory order.
    """
    transform = build_image_transform(image_size)
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])  # (N, 3, S, S)
    return batch.contiguous(memory_format=torch.channels_last)


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def finetune(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, settings: DemoSettings, seed: int) -> int:
    """Full fine-tuning with AdamW, linear warm-up and cosine decay (in place).

    Args:
        model: the model to train (every parameter).
        inputs: (N, 3, S, S) transformed images.
        labels: (N,) int64 labels.
        settings: epochs, batch size, learning rate, weight decay, warm-up, step cap.
        seed: seed of the shuffling generator.

    Returns:
        Number of optimiser steps taken.
    """
    steps_per_epoch = math.ceil(len(inputs) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, round(settings.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, warmup))
    generator = torch.Generator().manual_seed(seed)
    model.to(memory_format=torch.channels_last).train()
    step = 0
    while step < total:
        order = torch.randperm(len(inputs), generator=generator)  # (N,)
        for batch in order.split(settings.batch_size):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])  # logits (B, C)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total:
                break
        logger.debug("step %d/%d: loss %.4f", step, total, loss.item())
    return step


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on (N, 3, S, S) inputs and (N,) labels."""
    model.eval()
    predictions = torch.cat([model(chunk).argmax(dim=1) for chunk in inputs.split(batch_size)])  # (N,)
    return (predictions == labels).sum().item() / len(labels)


# --------------------------------------------------------------------------- cache


def _task_fingerprint(task: str, settings: DemoSettings, base_sha256: str) -> dict:
    return {
        "format": FORMAT_VERSION,
        "task": task,
        "task_seed": task_seed(settings.seed, task),
        "settings": asdict(settings),
        "base_sha256": base_sha256,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def _cached_task_is_valid(root: Path, task: str, entry: Mapping, fingerprint: Mapping) -> bool:
    """Whether the manifest entry of ``task`` matches ``fingerprint`` and the files on disk."""
    if not entry:
        return False
    if entry.get("fingerprint") != fingerprint:
        logger.info("%s: settings changed, rebuilding", task)
        return False
    expert = root / entry["expert"]["file"]
    if not expert.is_file() or sha256_file(expert) != entry["expert"]["sha256"]:
        logger.warning("%s: expert %s missing or modified, rebuilding", task, expert)
        return False
    for kind in ("calib", "eval"):
        if count_files(root / kind / task) != entry[f"{kind}_images"]:
            logger.warning("%s: %s folder incomplete, rebuilding", task, kind)
            return False
    return True


def _prepare_base(source: Path, root: Path, manifest: dict) -> str:
    """Copy the base weights into the cache unless an intact copy is there; return their sha256."""
    target = root / "base.pth"
    recorded = manifest.get("base", {}).get("sha256")
    if recorded and target.is_file() and sha256_file(target) == recorded:
        return recorded
    if not source.is_file():
        raise CheckpointError(f"missing base weights {source} (expected torchvision's mobilenet_v2-b0353104.pth)")
    load_base_model(source)  # validates the file before it enters the cache
    _write_bytes_atomic(target, source.read_bytes())
    digest = sha256_file(target)
    manifest["base"] = {"file": "base.pth", "sha256": digest, "source": str(source)}
    return digest


def write_task_folders(arrays: ImageArrays, parts: Mapping[str, np.ndarray], root: Path, task: str) -> None:
    """Write ``calib/<task>`` (unlabeled calibration rows) and ``eval/<task>`` (labelled test rows)."""
    for kind in ("calib", "eval"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    write_calib_folder(arrays, parts["calib"], root / "calib" / task)
    write_eval_folder(arrays, parts["test"], root / "eval" / task)


def train_expert(
    arrays: ImageArrays, parts: Mapping[str, np.ndarray], settings: DemoSettings, base_path: Path, seed: int
) -> tuple[nn.Module, int]:
    """Fine-tune a fresh expert on the ``finetune`` rows; return it with its number of steps."""
    model = build_expert_model(base_path, len(arrays.classes), seed)
    inputs = to_input_tensor(arrays.images[parts["finetune"]], settings.image_size)  # (F, 3, S, S)
    labels = torch.from_numpy(arrays.labels[parts["finetune"]])  # (F,)
    return model, finetune(model, inputs, labels, settings, seed)


def build_task(task: str, arrays: ImageArrays, root: Path, settings: DemoSettings, base_path: Path) -> tuple[dict, dict]:
    """Split one task, write its image folders, fine-tune, evaluate and save its expert.

    Args:
        task: task name.
        arrays: the task's data.
        root: cache folder.
        settings: demo settings.
        base_path: base state dict.

    Returns:
        ``(manifest entry, splits.json record)`` of the task.
    """
    seed = task_seed(settings.seed, task)
    sizes = {"test": settings.test_size, "calib": settings.calib_size, "finetune": settings.finetune_size}
    parts = split_indices(len(arrays), sizes, seed)
    if len(parts["finetune"]) < settings.finetune_size:
        logger.warning("%s: only %d fine-tuning rows left (asked %d)", task, len(parts["finetune"]), sizes["finetune"])
    write_task_folders(arrays, parts, root, task)

    started = time.perf_counter()
    model, steps = train_expert(arrays, parts, settings, base_path, seed)
    train_seconds = time.perf_counter() - started
    test_inputs = to_input_tensor(arrays.images[parts["test"]], settings.image_size)  # (T, 3, S, S)
    test_accuracy = accuracy(model, test_inputs, torch.from_numpy(arrays.labels[parts["test"]]))

    expert_path = root / "experts" / f"{task}.pth"
    save_state_dict_atomic(model.state_dict(), expert_path)
    entry = {
        "expert": {"file": f"experts/{task}.pth", "sha256": sha256_file(expert_path)},
        "accuracy": test_accuracy,
        "train_seconds": round(train_seconds, 2),
        "steps": steps,
        "classes": arrays.classes,
        "class_folders": class_folder_names(arrays.classes),
        "calib_images": len(parts["calib"]),
        "eval_images": len(parts["test"]),
        "finetune_images": len(parts["finetune"]),
        "source": {"rows": len(arrays), "images_sha256": sha256_array(arrays.images)},
    }
    logger.info("%s: expert trained in %.1f s (%d steps), test accuracy %.4f", task, train_seconds, steps, test_accuracy)
    return entry, describe_split(len(arrays), seed, parts)


def build_vision_demo(
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    quick: bool = False,
    image_size: int | None = None,
    finetune_size: int | None = None,
    calib_size: int | None = None,
    test_size: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    on_task_done: Callable[[], None] | None = None,
) -> DemoAssets:
    """Build (or reuse from the cache) the vision demo's base model, experts and image folders.

    Arguments left at ``None`` take the defaults of :class:`DemoSettings` (or of
    :data:`QUICK_SETTINGS` with ``quick=True``).

    Args:
        data_root: data root (see :func:`adamerge.datasets.vision.resolve_data_root`); only read
            when something must be built.
        cache_dir: cache folder (see :func:`resolve_cache_dir`).
        tasks: task names of :data:`adamerge.datasets.VISION_TASKS`.
        quick: smaller splits, images and training (smoke runs), cached in ``<cache>-quick`` unless
            ``cache_dir`` is given.
        image_size: square input side.
        finetune_size: fine-tuning rows per task.
        calib_size: calibration rows per task.
        test_size: test rows per task.
        epochs: fine-tuning epochs.
        batch_size: fine-tuning batch size.
        lr: peak learning rate.
        max_steps: cap on optimiser steps per expert.
        seed: master seed.
        force: rebuild every requested task even if the cache is valid.
        on_task_done: called once per task when its expert is built or found in the cache (a
            progress bar's step).

    Returns:
        The paths of the assets.
    """
    overrides = {
        "image_size": image_size, "finetune_size": finetune_size, "calib_size": calib_size,
        "test_size": test_size, "epochs": epochs, "batch_size": batch_size, "lr": lr, "max_steps": max_steps,
    }  # fmt: skip
    preset = QUICK_SETTINGS if quick else DemoSettings()
    settings = DemoSettings(**{**asdict(preset), **{k: v for k, v in overrides.items() if v is not None}, "seed": seed})
    tasks = list(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in VISION_TASKS]
    if unknown:
        raise DataError(f"unknown vision task(s) {', '.join(unknown)}; known: {', '.join(VISION_TASKS)}")
    root = resolve_cache_dir(cache_dir)
    if quick and cache_dir is None:  # quick assets never share a folder with the full ones (as the text demo)
        root = root.with_name(root.name + "-quick")
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_json(root / "manifest.json")
    if manifest.get("format") != FORMAT_VERSION:
        manifest = {"format": FORMAT_VERSION, "tasks": {}}
    splits = _read_json(root / "splits.json")
    data_root_path = resolve_data_root(data_root)
    base_sha256 = _prepare_base(data_root_path / BASE_WEIGHTS, root, manifest)

    for task in tasks:
        fingerprint = _task_fingerprint(task, settings, base_sha256)
        if not force and _cached_task_is_valid(root, task, manifest["tasks"].get(task, {}), fingerprint):
            logger.info("%s: reusing cached expert (accuracy %.4f)", task, manifest["tasks"][task]["accuracy"])
            if on_task_done is not None:
                on_task_done()
            continue
        entry, split = build_task(task, load_vision_task(task, data_root_path), root, settings, root / "base.pth")
        manifest["tasks"][task] = {"fingerprint": fingerprint, **entry}
        manifest["versions"] = versions()
        splits[task] = split
        _write_json_atomic(root / "splits.json", splits)
        _write_json_atomic(root / "manifest.json", manifest)
        if on_task_done is not None:
            on_task_done()
    _write_json_atomic(root / "manifest.json", manifest)
    return DemoAssets(
        root=root,
        base=root / "base.pth",
        experts={task: root / manifest["tasks"][task]["expert"]["file"] for task in tasks},
        calib_dir=root / "calib",
        eval_dir=root / "eval",
        image_size=settings.image_size,
        manifest=root / "manifest.json",
        splits=root / "splits.json",
        accuracy={task: manifest["tasks"][task]["accuracy"] for task in tasks},
    )


# --------------------------------------------------------------------------- evaluation table


def load_expert(path: Path, num_classes: int = 10) -> nn.Module:
    """``mobilenet_v2(num_classes=...)`` with an expert's state dict (eval mode)."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def cross_task_accuracy(assets: DemoAssets, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """Accuracy of every expert on every task's evaluation folder (read back from the PNG files).

    Returns:
        ``{expert task: {evaluated task: accuracy}}``; the diagonal equals ``assets.accuracy``.
    """
    transform = build_image_transform(assets.image_size)
    inputs = {}
    for task in assets.tasks:
        folder = LabelledImageFolder(assets.eval_dir / task, transform)
        images, labels = zip(*(folder[i] for i in range(len(folder))))
        inputs[task] = (torch.stack(images), torch.tensor(labels))  # (T, 3, S, S), (T,)
    table = {}
    for expert, path in assets.experts.items():
        model = load_expert(path).to(memory_format=torch.channels_last)
        table[expert] = {task: accuracy(model, x, y, batch_size) for task, (x, y) in inputs.items()}
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one row per expert and one column per evaluated task."""
    columns = list(next(iter(table.values())))
    width = max(len(name) for name in [*columns, *table, "expert \\ task"]) + 2
    lines = ["expert \\ task".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for expert, row in table.items():
        lines.append(expert.ljust(width) + "".join(f"{row[c]:.4f}".rjust(width) for c in columns))
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adamerge.demo.vision",
        description="Build (or reuse) the cached MobileNetV2 vision demo: experts, calibration and evaluation folders.",
    )
    parser.add_argument("--data-root", default=None, help="data root (default: $ADAMERGE_DATA_ROOT or ../shared/data)")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names (default: all five)")
    parser.add_argument("--quick", action="store_true", help="small splits, 48 px, 3 epochs (smoke runs, ~10 s per expert)")
    for name, kind in [("image-size", int), ("finetune-size", int), ("calib-size", int), ("test-size", int),
                       ("epochs", int), ("batch-size", int), ("lr", float), ("max-steps", int)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None, help="override the preset's value")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    parser.add_argument("--no-table", action="store_true", help="skip the expert x task accuracy table")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build the demo, then log each expert's accuracy on each task."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    try:
        assets = build_vision_demo(
            data_root=args.data_root, cache_dir=args.cache_dir, tasks=args.tasks, quick=args.quick,
            image_size=args.image_size, finetune_size=args.finetune_size, calib_size=args.calib_size,
            test_size=args.test_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            max_steps=args.max_steps, seed=args.seed, force=args.force,
        )  # fmt: skip
    except (DataError, CheckpointError) as error:
        logger.error("%s", error)
        return 2
    logger.info("assets ready in %s after %.1f s (image size %d)", assets.root, time.perf_counter() - started, assets.image_size)
    if not args.no_table:
        logger.info("accuracy of each expert (rows) on each task's test split (columns):\n%s", format_table(cross_task_accuracy(assets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
