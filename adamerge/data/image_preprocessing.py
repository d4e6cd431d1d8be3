"""Which image size and normalisation the experts expect, decided once and logged.

A merge feeds the calibration and evaluation images to the merged model as the experts saw them.
Where the numbers come from, first match first:

1. the command line (``--image-size``, ``--image-mean``, ``--image-std``; each overrides only
   itself);
2. the model's own metadata (:func:`model_metadata`): torchvision's default weights' evaluation
   transforms for ``torchvision:NAME``, timm's ``pretrained_cfg`` (also on any module that carries
   one, as import-path models built on timm do), open_clip's ``preprocess_cfg``;
3. the calibration data: when every calibration image has the same size, they are used at that
   size (no resize, no crop);
4. 224 px with ImageNet statistics, with a warning saying which option sets them.

When the model's metadata and the calibration images disagree by more than a factor of two (a
model pretrained at 224 px, a folder of 32 px images), a warning names both sizes: a 7x upscaled
input costs about 49x the compute and is often not what the experts were fine-tuned on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn
from torchvision import transforms

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FALLBACK_SIZE = 224
INTERPOLATIONS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class ImagePreprocessing:
    """An evaluation transform's numbers and where they came from.

    Attributes:
        size: ``(height, width)`` of the input, or ``None``: the images are used at their own size.
        resize: side the shorter image side is resized to before the centre crop to ``size``
            (``None``: resize to ``size`` itself, as ``Resize(S)`` + ``CenterCrop(S)``).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        origin: what the size came from, for the log (``"--image-size"``, ``"timm's pretrained_cfg"``).
        normalisation_origin: what the mean and standard deviation came from.
    """

    size: tuple[int, int] | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    interpolation: str = "bilinear"
    origin: str = "default"
    normalisation_origin: str = "ImageNet statistics"

    def transform(self) -> transforms.Compose:
        """PIL image (any mode; converted to RGB) -> float tensor (3, H, W)."""
        steps: list[Any] = [transforms.Lambda(_rgb)]
        if self.size is not None:
            mode = INTERPOLATIONS[self.interpolation]
            square = self.size[0] == self.size[1]
            side = self.resize if self.resize is not None else (self.size[0] if square else self.size)
            steps += [transforms.Resize(side, interpolation=mode), transforms.CenterCrop(self.size)]
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def describe(self) -> str:
        """One line: size (resize, crop), normalisation and their origins."""
        if self.size is None:
            size = "each image at its own size"
        else:
            size = f"{self.size[0]}x{self.size[1]} px"
            if self.resize is not None and self.resize != min(self.size):
                size += f" (shorter side resized to {self.resize}, centre crop)"
        numbers = f"mean {_floats(self.mean)}, std {_floats(self.std)}"
        return f"{size}, {self.interpolation} ({self.origin}); {numbers} ({self.normalisation_origin})"


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _floats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    values = [int(v) for v in size]
    return (values[-2], values[-1]) if len(values) >= 2 else (values[0], values[0])


def model_metadata(spec: str, model: nn.Module) -> ImagePreprocessing | None:
    """The preprocessing the architecture's own library records for it, or ``None``.

    Args:
        spec: the architecture spec (``torchvision:NAME``, ``timm:NAME``, ``open_clip:NAME``,
            ``package.module:factory``).
        model: the built architecture (timm and open_clip keep their configs on the module).
    """
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        found = _torchvision_metadata(name)
        if found is not None:
            return found
    for module in (model, getattr(model, "visual", None)):
        if module is None:
            continue
        for attribute in ("pretrained_cfg", "default_cfg"):
            config = getattr(module, attribute, None)
            if isinstance(config, dict) and "input_size" in config:
                return _timm_metadata(config, f"{type(module).__name__}.{attribute} (timm)")
        config = getattr(module, "preprocess_cfg", None)
        if isinstance(config, dict) and "size" in config:
            return open_clip_metadata(config, f"open_clip's preprocess_cfg of {name or spec}")
    return None


def _torchvision_metadata(name: str) -> ImagePreprocessing | None:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):  # a model without published weights
        return None
    preset = weights.transforms()  # ImageClassification: numbers only, nothing is downloaded
    crop = getattr(preset, "crop_size", None)
    if not crop:
        return None
    interpolation = getattr(preset, "interpolation", transforms.InterpolationMode.BILINEAR).value
    origin = f"torchvision's {type(weights).__name__}.{weights.name} transforms"
    return ImagePreprocessing(
        size=_pair(crop),
        resize=int(preset.resize_size[0]) if getattr(preset, "resize_size", None) else None,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
        origin=origin,
        normalisation_origin=origin,
    )


def _timm_metadata(config: dict[str, Any], origin: str) -> ImagePreprocessing:
    size = _pair(config["input_size"])
    crop_pct = config.get("crop_pct")
    resize = int(size[0] / crop_pct) if crop_pct else None  # timm's eval transform: floor(S / crop_pct)
    interpolation = config.get("interpolation", "bilinear")
    return ImagePreprocessing(
        size=size,
        resize=resize,
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        origin=origin,
        normalisation_origin=origin,
    )


def open_clip_metadata(config: dict[str, Any], origin: str) -> ImagePreprocessing:
    """The numbers of an open_clip ``preprocess_cfg`` (``size``, ``mean``, ``std``, ``interpolation``)."""
    interpolation = config.get("interpolation", "bicubic")
    return ImagePreprocessing(
        size=_pair(config["size"]),
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        origin=origin,
        normalisation_origin=origin,
    )


def common_image_size(paths: Iterable[Path]) -> tuple[tuple[int, int] | None, int]:
    """``((height, width), count)`` if every readable image in ``paths`` has that size, else
    ``(None, count)``. Reads headers only."""
    sizes: set[tuple[int, int]] = set()
    count = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.add((image.height, image.width))
        except Exception:  # noqa: BLE001 - undecodable files are reported when the datasets are built
            continue
        count += 1
        if len(sizes) > 1:
            return None, count
    return (next(iter(sizes)) if sizes else None), count


def resolve_image_preprocessing(
    metadata: ImagePreprocessing | None,
    image_paths: Iterable[Path],
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImagePreprocessing:
    """The preprocessing to use (see the module docstring for the order), logged in one line.

    Args:
        metadata: what the model records (:func:`model_metadata`), or ``None``.
        image_paths: the calibration images (their headers are read once).
        size: ``--image-size`` (square side), or ``None``.
        mean: ``--image-mean``, or ``None``.
        std: ``--image-std``, or ``None``.
    """
    data_size, count = common_image_size(image_paths)
    fallback = False
    if size is not None:
        chosen = (
            replace(metadata, size=(size, size), resize=None, origin="--image-size")
            if metadata
            else ImagePreprocessing(size=(size, size), origin="--image-size")
        )
    elif metadata is not None:
        chosen = metadata
        if data_size is not None and max(metadata.size[0] / data_size[0], data_size[0] / metadata.size[0]) > 2:
            logger.warning(
                "the model's metadata asks for %dx%d px images (%s) and all %d calibration images are %dx%d: they are "
                "resized to %dx%d; pass --image-size %d if the experts were fine-tuned at the images' own size",
                *metadata.size,
                metadata.origin,
                count,
                *data_size,
                *metadata.size,
                data_size[0],
            )
    elif data_size is not None:
        chosen = ImagePreprocessing(size=None, origin=f"all {count} calibration images are {data_size[0]}x{data_size[1]}")
    else:
        fallback = True
        chosen = ImagePreprocessing(
            size=(FALLBACK_SIZE, FALLBACK_SIZE),
            origin="fallback: no size in the model's metadata and the calibration images differ in size",
        )
    if mean is not None:
        chosen = replace(chosen, mean=tuple(mean), normalisation_origin="--image-mean / --image-std")
    if std is not None:
        chosen = replace(chosen, std=tuple(std), normalisation_origin="--image-mean / --image-std")
    if fallback or (metadata is None and mean is None and std is None):
        logger.warning(
            "image preprocessing: %s. The model carries no preprocessing metadata: if its experts were fine-tuned "
            "otherwise, pass --image-size / --image-mean / --image-std",
            chosen.describe(),
        )
    else:
        logger.info("image preprocessing: %s", chosen.describe())
    return chosen
