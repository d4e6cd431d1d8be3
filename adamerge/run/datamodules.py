"""The DataModule for an expert set's modality: images (:mod:`adamerge.data.images`) or texts
(:mod:`adamerge.data.texts`), with the image size and normalisation resolved once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from adamerge.data.image_preprocessing import resolve_image_preprocessing
from adamerge.data.images import MultiTaskImageDataModule, list_images
from adamerge.errors import DataError

if TYPE_CHECKING:
    from adamerge.sources.base import ExpertSet

logger = logging.getLogger(__name__)


def build_datamodule(
    experts: ExpertSet,
    calib_dir: str | Path,
    *,
    image_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    max_length: int = 128,
    **options: Any,
) -> L.LightningDataModule:
    """The multi-task DataModule for ``experts``' modality.

    Images: :class:`MultiTaskImageDataModule` with the source's own preprocessing if it has one
    (open_clip), else the size and normalisation that
    :func:`adamerge.data.image_preprocessing.resolve_image_preprocessing` finds (the options, the
    model's metadata, the calibration images' common size, 224 px with a warning). Text:
    :class:`adamerge.data.texts.MultiTaskTextDataModule` with the base's tokenizer, ``max_length``
    tokens per example.

    Args:
        experts: the loaded expert set (its ``modality``, ``image_transform``,
            ``image_preprocessing`` and ``tokenizer``).
        calib_dir: one folder of unlabeled data per task.
        image_size: ``--image-size`` (``None``: found as above).
        image_mean: ``--image-mean`` (``None``: the model's, else ImageNet's).
        image_std: ``--image-std`` (``None``: the model's, else ImageNet's).
        max_length: tokens per example (text experts).
        **options: the DataModules' shared arguments (``eval_dir``, ``batch_size``, ``seed``, ...).
    """
    if experts.modality == "text":
        from adamerge.data.texts import MultiTaskTextDataModule

        return MultiTaskTextDataModule(
            calib_dir,
            experts.tasks,
            experts.tokenizer,
            max_length=max_length,
            num_classes=experts.num_classes or None,
            answers=experts.task_type.generates,
            **options,
        )
    if experts.modality != "image":
        raise DataError(f"expert source produced modality {experts.modality!r}: expected 'image' or 'text'")
    if options.pop("group_by_length", False):
        raise DataError("--group-by-length groups texts by token count: these experts take images")
    transform = experts.image_transform
    if transform is not None:
        if image_size is not None or image_mean is not None or image_std is not None:
            logger.warning("--image-size / --image-mean / --image-std are ignored: the expert source brings its own preprocessing")
        logger.info("image preprocessing: the expert source's own (%s)", getattr(experts.image_preprocessing, "origin", "its transform"))
    else:
        paths = [p for folder in _image_folders(calib_dir, options.get("eval_dir"), experts.tasks) for p in list_images(folder)]
        transform = resolve_image_preprocessing(experts.image_preprocessing, paths, image_size, image_mean, image_std).transform()
    return MultiTaskImageDataModule(calib_dir, experts.tasks, transform=transform, **options)


def _image_folders(calib_dir: str | Path, eval_dir: str | Path | None, tasks: Sequence[str]) -> list[Path]:
    """Each task's calibration and evaluation folders that exist (the images' sizes are read)."""
    roots = [Path(calib_dir)] + ([Path(eval_dir)] if eval_dir is not None else [])
    return [root / task for root in roots for task in tasks if (root / task).is_dir()]
