"""Calibration and evaluation data: unlabeled image folders per task, labelled folders, and a
round-robin multi-task DataModule.

Layouts:

- calibration (unlabeled): ``CALIB/<task>/**/<image>`` — every decodable image below the task's
  folder, labels (if any sub-folders exist) are ignored;
- evaluation (labelled): ``EVAL/<task>/<class>/<image>`` — classes are the sub-folder names in
  sorted order (torchvision ``ImageFolder`` convention), so class ``i`` is the ``i``-th name.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from adamerge.data.image_preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from adamerge.data.resumable_loader import ResumableLoader, share_epochs
from adamerge.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def build_image_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """The square evaluation transform: resize (shorter side) to ``image_size``, centre crop,
    normalise (:class:`adamerge.data.image_preprocessing.ImagePreprocessing` with a given size).

    Returns:
        A transform from a PIL image (any mode; converted to RGB) to a float tensor (3, S, S).
    """
    return ImagePreprocessing(size=(image_size, image_size), mean=tuple(mean), std=tuple(std)).transform()


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# what PIL raises for a file it cannot read: OSError (UnidentifiedImageError, truncated data),
# SyntaxError / struct.error / IndexError / TypeError / ValueError / EOFError from format
# plugins on malformed headers, DecompressionBombError (an Exception, not an OSError) for a header
# declaring more than twice ``Image.MAX_IMAGE_PIXELS`` pixels
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError)


def _open_image(path: Path) -> Image.Image | None:
    """``path`` fully decoded, or ``None`` (logged) if it no longer decodes.

    PIL's :class:`~PIL.Image.DecompressionBombWarning` (an image between one and two times
    ``Image.MAX_IMAGE_PIXELS``) is silenced here: the scan logged it once, and under
    ``python -W error`` it would otherwise stop the run.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.copy()
    except _DECODE_ERRORS as error:
        logger.warning("skipping %s: cannot decode image (%s)", path, error)
        return None


def _decodes(path: Path) -> bool:
    """Whether ``path`` is an image that decodes completely (warnings name the file otherwise).

    Two passes: :meth:`PIL.Image.Image.verify` (chunk structure and CRCs, without pixels), then a
    full :meth:`~PIL.Image.Image.load`. ``verify()`` alone accepts files whose pixel data is cut
    short inside well-formed chunks (e.g. a PNG whose IDAT chunk holds half of its compressed
    stream); those would fail in ``__getitem__``, mid-training. Decoding every file once while the
    folder is scanned keeps the dataset's items fixed before any sampler, shard or label count is
    built from them (each DDP rank finds the same list), where a fallback at ``__getitem__`` time
    would have to substitute another image (and, for evaluation, count its label twice). The cost
    is well under a millisecond per image, paid once when the dataset is built.

    Headers declaring more than twice ``Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb
    limit) are skipped, naming the declared size; between one and two times the limit PIL only
    warns: the image is used and the warning logged here once.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and image.width * image.height > limit:
                    logger.warning(
                        "%s: large image (%dx%d pixels, over PIL's MAX_IMAGE_PIXELS %d): decoding it anyway",
                        path,
                        image.width,
                        image.height,
                        limit,
                    )
                image.load()
        return True
    except Image.DecompressionBombError as error:
        size = _declared_size(path)
        declared = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else str(error)
        logger.warning(
            "skipping %s: its header declares %s, over PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS = %s pixels)",
            path,
            declared,
            2 * (Image.MAX_IMAGE_PIXELS or 0),
        )
        return False
    except _DECODE_ERRORS as error:
        logger.warning("skipping %s: not a decodable image (%s)", path, error)
        return False


def _declared_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header of an image that ``Image.open`` refuses as a decompression
    bomb: the format plugins parse the header only (no pixels), as ``Image.open`` does before its
    size check."""
    Image.init()
    try:
        with path.open("rb") as handle:
            prefix = handle.read(16)
            for format_id in Image.ID:
                factory, accept = Image.OPEN[format_id]
                accepted = accept(prefix) if accept is not None else True
                if not accepted or isinstance(accepted, str):  # a str: PIL's reason for refusing it
                    continue
                handle.seek(0)
                try:
                    return tuple(factory(handle, str(path)).size)
                except _DECODE_ERRORS:
                    continue
    except OSError:
        return None
    return None


class UnlabeledImageFolder(Dataset):
    """Every decodable image below ``root``; items are transformed tensors (3, S, S).

    Undecodable files (unreadable headers, pixel data cut short, decompression bombs) are found
    when the dataset is built (each file is decoded once, see :func:`_decodes`), logged as warnings
    and skipped; a folder with nothing usable raises :class:`DataError`.
    """

    def __init__(self, root: str | Path, transform) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"calibration folder {self.root} does not exist (expected a folder of images)")
        candidates = list_images(self.root)
        self.paths = [p for p in candidates if _decodes(p)]
        if not self.paths:
            raise DataError(
                f"calibration folder {self.root} holds no decodable image "
                f"({len(candidates)} candidate files with suffixes {', '.join(IMAGE_SUFFIXES)})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = _open_image(self.paths[index])
        if image is None:  # decoded during the scan: the file changed since
            raise DataError(f"image {self.paths[index]} no longer decodes (it did when {self.root} was scanned)")
        return self.transform(image)


class LabelledImageFolder(Dataset):
    """``root/<class>/<image>``; items are ``(image (3, S, S), label)`` with sorted class names.

    Undecodable files are skipped with a warning when the dataset is built, as in
    :class:`UnlabeledImageFolder`; a folder with nothing usable raises :class:`DataError`.
    """

    def __init__(self, root: str | Path, transform) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"evaluation folder {self.root} does not exist (expected <task>/<class>/<image>)")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(f"evaluation folder {self.root} has no class sub-folders (expected <class>/<image>)")
        self.samples = [
            (path, label) for label, name in enumerate(self.classes) for path in list_images(self.root / name) if _decodes(path)
        ]
        if not self.samples:
            raise DataError(f"evaluation folder {self.root} holds no decodable image")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _open_image(path)
        if image is None:  # decoded during the scan: the file changed since
            raise DataError(f"image {path} no longer decodes (it did when {self.root} was scanned)")
        return self.transform(image), label


class CalibrationView(Dataset):
    """The training items of one task: a (seeded) subset of a calibration dataset (images or
    tokenised texts).

    Items are the input alone, or a dict ``{"inputs", "labels"?, "index"?}`` where ``index``
    is the item's position in this view (to look up cached expert outputs) and ``labels`` come from
    a labelled source (few-shot).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], with_index: bool = False) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        item = self.dataset[self.indices[position]]
        if isinstance(item, tuple):
            out = {"inputs": item[0], "labels": item[1]}
        elif self.with_index:
            out = {"inputs": item}
        else:
            return item
        if self.with_index:
            out["index"] = position
        return out


def few_shot_indices(labels: LabelledImageFolder | Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` sample indices per class, drawn with ``seed`` (all of a class if it has fewer), in
    dataset order within each class.

    Args:
        labels: the class index of every sample, or a :class:`LabelledImageFolder`.
        shots: samples per class.
        seed: seed of the draw.
    """
    if isinstance(labels, LabelledImageFolder):
        labels = [label for _, label in labels.samples]
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator)[:shots]
        chosen.extend(members[i] for i in sorted(order.tolist()))
    return chosen


class MultiTaskDataModule(L.LightningDataModule):
    """What the image and text DataModules share: seeded loaders with per-rank sharding, the
    round-robin training loader and the per-task evaluation loaders.

    Subclasses fill ``calibration`` and ``evaluation`` (``{task: dataset}``) in ``setup`` and may
    set ``collate`` (``None``: PyTorch's default collation). The arguments are described by the
    subclasses.
    """

    collate: Callable[[list[Any]], Any] | None = None

    def __init__(
        self,
        calib_dir: str | Path,
        tasks: Sequence[str],
        eval_dir: str | Path | None,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool,
        shots: int | None,
        limit_per_task: int | None,
        with_index: bool,
        holdout: float = 0.0,
    ) -> None:
        super().__init__()
        self.calib_dir = Path(calib_dir)
        self.eval_dir = Path(eval_dir) if eval_dir is not None else None
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.shots = shots
        self.limit_per_task = limit_per_task
        self.with_index = with_index
        self.holdout = holdout
        self.held_out: dict[str, CalibrationView] = {}

    def calibration_split(self, task: str, dataset: Dataset, seed: int, labels: Sequence[int] | None = None) -> CalibrationView:
        """The training view of one task's calibration ``dataset``; its held-out inputs go to
        :attr:`held_out`.

        Unlabeled data: ``floor(holdout × N)`` seeded items are held out first (none when that is
        0 or would leave nothing to train on), and ``limit_per_task`` of the rest are trained on
        (all without a limit). Few-shot data (``labels`` given): the ``shots`` per class are drawn
        first, from every item, so that a hold-out never takes a shot; the held-out items come from
        the rest of the folder, as far as it goes (their labels are not used). Without a hold-out
        the draws are those of :meth:`subset_indices` and :func:`few_shot_indices`.

        Args:
            task: the task (key of :attr:`held_out`).
            dataset: all calibration items of the task.
            seed: the task's seed.
            labels: the class of every item (few-shot data), or ``None``.
        """
        size = len(dataset)
        wanted = int(self.holdout * size)
        generator = torch.Generator().manual_seed(seed + 1)
        if labels is not None:
            chosen = few_shot_indices(labels, self.shots, seed)
            taken = set(chosen)
            others = [i for i in range(size) if i not in taken]
            order = torch.randperm(len(others), generator=generator)[:wanted].tolist()
            held_indices = sorted(others[i] for i in order)
        else:
            held_indices = sorted(torch.randperm(size, generator=generator)[:wanted].tolist()) if wanted < size else []
            held = set(held_indices)
            rest = [i for i in range(size) if i not in held]
            chosen = [rest[i] for i in self.subset_indices(len(rest), seed)]
        if held_indices:
            self.held_out[task] = CalibrationView(dataset, held_indices)
        return CalibrationView(dataset, chosen, self.with_index)

    def holdout_loaders(self) -> dict[str, DataLoader]:
        """One unshuffled loader per task over its held-out calibration inputs (tasks with none
        are left out), in batches of ``eval_batch_size``; every rank sees them all."""
        self.setup("fit")
        return {task: self._loader(view, self.eval_batch_size, shuffle=False) for task, view in self.held_out.items()}

    def subset_indices(self, size: int, seed: int) -> list[int]:
        """``limit_per_task`` seeded indices of ``range(size)`` (all of them without a limit)."""
        indices = list(range(size))
        if self.limit_per_task is not None and self.limit_per_task < size:
            generator = torch.Generator().manual_seed(seed)
            indices = sorted(torch.randperm(size, generator=generator)[: self.limit_per_task].tolist())
        return indices

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed_offset: int = 0, distributed: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + seed_offset)
        # our own shard per rank, honouring ``shuffle`` (Lightning would always shuffle training data)
        distributed = distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
        return ResumableLoader(  # its position travels with checkpoints (exact resume)
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            distributed=distributed,
            seed=self.seed + seed_offset,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def calibration_loaders(self, shuffle: bool | None = None, distributed: bool = False) -> dict[str, DataLoader]:
        """One loader of calibration batches per task.

        Args:
            shuffle: shuffle the order (default: the module's ``shuffle``).
            distributed: shard across DDP ranks (training); off, every rank sees all the data, as
                BatchNorm re-estimation needs for identical statistics on every rank.
        """
        self.setup("fit")
        shuffle = self.shuffle if shuffle is None else shuffle
        return {
            task: self._loader(ds, self.batch_size, shuffle, seed_offset=i, distributed=distributed)
            for i, (task, ds) in enumerate(self.calibration.items())
        }

    def statistics_loaders(self) -> dict[str, DataLoader]:
        """One loader per task over every unlabeled calibration input, in file order, for
        re-estimating BatchNorm statistics (the held-out inputs too: they are kept from the
        objective, not from the statistics).

        ``limit_per_task`` limits what the objective trains on (Expert Merging's few samples per
        task), not the statistics: running means and variances from 10 images per task are noise
        (see the README's *BatchNorm*). Few-shot
        data stays the shots: the rest of a labelled folder is not the user's to spend.
        """
        self.setup("fit")
        views = {
            task: view if self.shots is not None else CalibrationView(view.dataset, range(len(view.dataset)))
            for task, view in self.calibration.items()
        }  # every input, the held-out ones included (they are only kept from the objective)
        return {task: self._loader(view, self.batch_size, shuffle=False) for task, view in views.items()}

    def target_loaders(self) -> dict[str, DataLoader]:
        """One loader per task over the training items (with their ``index``), unshuffled, in
        batches of ``eval_batch_size``: for computing each expert's outputs once (Expert Merging's
        targets), which are then put back in index order."""
        self.setup("fit")
        return {task: self._loader(view, self.eval_batch_size, shuffle=False) for task, view in self.calibration.items()}

    def train_dataloader(self) -> CombinedLoader:
        loaders = self.calibration_loaders(distributed=True)
        share_epochs(loaders.values())  # an epoch's end restarts every task's pass (exact resume)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def evaluation_loaders(self) -> list[DataLoader]:
        if self.eval_dir is None:
            return []
        self.setup("test")
        return [self._loader(self.evaluation[t], self.eval_batch_size, shuffle=False) for t in self.tasks]

    def val_dataloader(self) -> list[DataLoader]:
        return self.evaluation_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self.evaluation_loaders()


class MultiTaskImageDataModule(MultiTaskDataModule):
    """Unlabeled calibration images per task (training) and optional labelled evaluation images.

    Training batches are dictionaries ``{task: images (B, 3, S, S)}``: every step sees one batch of
    every task (round robin, shorter tasks cycle: Lightning's ``CombinedLoader`` in
    ``max_size_cycle`` mode). Validation and test iterate the tasks one after another; the
    dataloader index is the task's position in ``tasks``.

    Args:
        calib_dir: folder with one sub-folder of unlabeled images per task.
        tasks: task names (sub-folder names), in the experts' order.
        eval_dir: optional folder ``<task>/<class>/<image>`` of labelled images.
        batch_size: images per task per step.
        eval_batch_size: images per evaluation batch.
        image_size: square input side (see :func:`build_image_transform`).
        mean: normalisation mean.
        std: normalisation standard deviation.
        num_workers: data-loader worker processes.
        seed: seed of the training shuffle and of the subsets below.
        shuffle: shuffle the calibration data (off: fixed order, e.g. to compare runs exactly).
        shots: read the calibration folder as labelled ``<task>/<class>/<image>`` and keep this many
            images per class (seeded), for few-shot objectives.
        limit_per_task: keep this many calibration images per task (seeded subset).
        with_index: training items carry their index in the task's calibration view.
        holdout: share of each task's calibration images held out of training (for
            :class:`adamerge.run.safeguard.KeepBestCoefficients`; see :meth:`calibration_split`).
        transform: the image preprocessing to use instead of the one built from ``image_size``,
            ``mean`` and ``std`` (e.g. open_clip's own).
    """

    def __init__(
        self,
        calib_dir: str | Path,
        tasks: Sequence[str],
        eval_dir: str | Path | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 128,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shots: int | None = None,
        limit_per_task: int | None = None,
        with_index: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        holdout: float = 0.0,
    ) -> None:
        super().__init__(
            calib_dir,
            tasks,
            eval_dir,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            shuffle,
            shots,
            limit_per_task,
            with_index,
            holdout,
        )
        self.transform = transform if transform is not None else build_image_transform(image_size, mean, std)
        if not self.calib_dir.is_dir():
            raise DataError(f"--calib {self.calib_dir} does not exist (expected one folder of images per task)")
        self.calibration: dict[str, CalibrationView] = {}
        self.evaluation: dict[str, LabelledImageFolder] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.calibration:
            missing = [t for t in self.tasks if not (self.calib_dir / t).is_dir()]
            if missing:
                raise DataError(
                    f"--calib {self.calib_dir} has no sub-folder for task(s) {', '.join(missing)} "
                    f"(found: {', '.join(sorted(p.name for p in self.calib_dir.iterdir() if p.is_dir())) or 'none'})"
                )
            self.calibration = {t: self._calibration_view(t, k) for k, t in enumerate(self.tasks)}
        if self.eval_dir is not None and not self.evaluation and stage in (None, "fit", "validate", "test"):
            self.evaluation = {t: LabelledImageFolder(self.eval_dir / t, self.transform) for t in self.tasks}

    def _calibration_view(self, task: str, position: int) -> CalibrationView:
        seed = self.seed + 1000 * (position + 1)
        if self.shots is not None:
            labelled = LabelledImageFolder(self.calib_dir / task, self.transform)
            return self.calibration_split(task, labelled, seed, [label for _, label in labelled.samples])
        return self.calibration_split(task, UnlabeledImageFolder(self.calib_dir / task, self.transform), seed)

    def class_counts(self) -> Mapping[str, int]:
        """Number of classes per task in the evaluation data (empty without ``eval_dir``)."""
        self.setup("test")
        return {t: len(ds.classes) for t, ds in self.evaluation.items()}
