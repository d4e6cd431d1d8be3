"""Readers for the real image classification data sets under a data root.

Every reader returns an :class:`ImageArrays`: uint8 pixels, int64 labels in ``0..C-1`` and the
class names in label order. One function per on-disk format:

- :func:`read_idx_pair`: idx files, gzip-compressed (MNIST, Fashion-MNIST, Kannada-MNIST);
- :func:`read_libsvm_images`: libsvm text, bzip2-compressed, pixels in ``[-1, 1]`` (USPS);
- :func:`read_image_npz`: npz with keys ``x``, ``y`` and ``classes`` (CIFAR-10).

:data:`VISION_TASKS` maps a task name to a loader ``(data_root) -> ImageArrays``. The data root
is an argument everywhere; when it is ``None`` it falls back to the environment variable
``ADAMERGE_DATA_ROOT``, then to ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adamerge.errors import DataError

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "ADAMERGE_DATA_ROOT"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image data set held in memory.

    Attributes:
        images: uint8 pixels, (N, H, W) for grayscale or (N, H, W, 3) for RGB.
        labels: int64 labels in ``0..len(classes)-1``, shape (N,).
        classes: class names; ``classes[i]`` is the name of label ``i``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DataError(f"images must be uint8 (N, H, W[, 3]), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(f"labels span {self.labels.min()}..{self.labels.max()}, expected 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageArrays:
        """The rows ``indices`` (in that order) as a new :class:`ImageArrays`."""
        return ImageArrays(self.images[indices], self.labels[indices], list(self.classes))


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data root: the argument, else ``$ADAMERGE_DATA_ROOT``, else ``../shared/data``.

    Args:
        data_root: explicit data root, or ``None`` for the fallbacks.

    Returns:
        The data root as an absolute path (not checked for existence).
    """
    if data_root is None:
        data_root = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(data_root).expanduser().resolve()


def _require_file(data_root: Path, relative: str) -> Path:
    path = data_root / relative
    if not path.is_file():
        raise DataError(f"missing data file {relative} under data root {data_root} (pass data_root=... or set ${DATA_ROOT_ENV})")
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """One gzip-compressed idx file (the MNIST format) as an array.

    Args:
        path: the ``*-ubyte.gz`` file.

    Returns:
        The array with the shape and dtype the header declares.

    Raises:
        DataError: if the file is not a well-formed idx file.
    """
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: header declares shape {shape} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def read_idx_pair(data_root: str | Path | None, images_file: str, labels_file: str, classes: Sequence[str]) -> ImageArrays:
    """An idx image file and its idx label file (MNIST, Fashion-MNIST, Kannada-MNIST).

    Args:
        data_root: data root (see :func:`resolve_data_root`).
        images_file: path of the images file relative to the data root.
        labels_file: path of the labels file relative to the data root.
        classes: class names in label order.

    Returns:
        Images (N, H, W) uint8 and labels (N,) int64.
    """
    root = resolve_data_root(data_root)
    images = read_idx(_require_file(root, images_file))  # (N, H, W) uint8
    labels = read_idx(_require_file(root, labels_file)).astype(np.int64)  # (N,)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_file}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    return ImageArrays(np.ascontiguousarray(images), labels, list(classes))


def read_libsvm_images(
    data_root: str | Path | None,
    file: str,
    image_shape: tuple[int, int],
    classes: Sequence[str],
    value_range: tuple[float, float] = (-1.0, 1.0),
    first_label: int = 1,
) -> ImageArrays:
    """A bzip2-compressed libsvm file of images (USPS).

    Each line is ``label index:value ...`` with 1-based feature indices; absent features are 0.
    Values are mapped linearly from ``value_range`` to 0..255 and rounded.

    Args:
        data_root: data root (see :func:`resolve_data_root`).
        file: path of the ``.bz2`` file relative to the data root.
        image_shape: (H, W) of one image; H*W features per row.
        classes: class names in label order.
        value_range: the (low, high) pixel values that map to 0 and 255.
        first_label: the file's label of class 0 (USPS: labels 1..10 become 0..9).

    Returns:
        Images (N, H, W) uint8 and labels (N,) int64.
    """
    path = _require_file(resolve_data_root(data_root), file)
    n_features = image_shape[0] * image_shape[1]
    with bz2.open(path, "rt") as stream:
        lines = [line.split() for line in stream if line.strip()]
    values = np.zeros((len(lines), n_features), dtype=np.float64)  # (N, H*W)
    labels = np.empty(len(lines), dtype=np.int64)  # (N,)
    for row, fields in enumerate(lines):
        labels[row] = int(float(fields[0])) - first_label
        for field in fields[1:]:
            index, value = field.split(":")
            values[row, int(index) - 1] = float(value)
    low, high = value_range
    scaled = np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255)  # (N, H*W)
    images = scaled.astype(np.uint8).reshape(len(lines), *image_shape)  # (N, H, W)
    return ImageArrays(images, labels, list(classes))


def read_image_npz(data_root: str | Path | None, files: Sequence[str]) -> ImageArrays:
    """One or more npz files with keys ``x`` (N, H, W, 3) uint8, ``y`` (N,) and ``classes``.

    Several files are concatenated in the given order; they must list the same classes.

    Args:
        data_root: data root (see :func:`resolve_data_root`).
        files: npz paths relative to the data root.

    Returns:
        Images (N, H, W, 3) uint8 and labels (N,) int64.
    """
    root = resolve_data_root(data_root)
    images, labels, classes = [], [], None
    for file in files:
        with np.load(_require_file(root, file), allow_pickle=False) as archive:
            missing = {"x", "y", "classes"} - set(archive.files)
            if missing:
                raise DataError(f"{file} under {root} lacks key(s) {sorted(missing)} (has {archive.files})")
            file_classes = [str(name) for name in archive["classes"]]
            if classes is not None and file_classes != classes:
                raise DataError(f"{file} lists classes {file_classes}, earlier files {classes}")
            classes = file_classes
            images.append(archive["x"])  # (n, H, W, 3) uint8
            labels.append(archive["y"].astype(np.int64))  # (n,)
    return ImageArrays(np.concatenate(images), np.concatenate(labels), classes or [])


def load_mnist(data_root: str | Path | None = None) -> ImageArrays:
    """MNIST test split: 10,000 images (28, 28)."""
    return read_idx_pair(data_root, "images/mnist/t10k-images-idx3-ubyte.gz", "images/mnist/t10k-labels-idx1-ubyte.gz", DIGIT_CLASSES)


def load_fashion_mnist(data_root: str | Path | None = None) -> ImageArrays:
    """Fashion-MNIST test split: 10,000 images (28, 28)."""
    return read_idx_pair(
        data_root,
        "images/fashion_mnist/t10k-images-idx3-ubyte.gz",
        "images/fashion_mnist/t10k-labels-idx1-ubyte.gz",
        FASHION_MNIST_CLASSES,
    )


def load_kannada_mnist(data_root: str | Path | None = None) -> ImageArrays:
    """Kannada-MNIST test split: 10,000 images (28, 28) of Kannada digits."""
    return read_idx_pair(
        data_root,
        "images/kannada_mnist/X_kannada_MNIST_test-idx3-ubyte.gz",
        "images/kannada_mnist/y_kannada_MNIST_test-idx1-ubyte.gz",
        DIGIT_CLASSES,
    )


def load_usps(data_root: str | Path | None = None) -> ImageArrays:
    """USPS test split: 2,007 images (16, 16)."""
    return read_libsvm_images(data_root, "images/usps/usps.t.bz2", (16, 16), DIGIT_CLASSES)


def load_cifar10(data_root: str | Path | None = None) -> ImageArrays:
    """CIFAR-10: 10,000 training rows then the 10,000 test rows, images (32, 32, 3)."""
    return read_image_npz(data_root, ["images/cifar10/cifar10_train10k_jpeg.npz", "images/cifar10/cifar10_test_jpeg.npz"])


VISION_TASKS: dict[str, Callable[[str | Path | None], ImageArrays]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "kannada_mnist": load_kannada_mnist,
    "usps": load_usps,
}


def load_vision_task(task: str, data_root: str | Path | None = None) -> ImageArrays:
    """The arrays of one task of :data:`VISION_TASKS`.

    Args:
        task: task name, a key of :data:`VISION_TASKS`.
        data_root: data root (see :func:`resolve_data_root`).

    Raises:
        DataError: for an unknown task or a missing file.
    """
    if task not in VISION_TASKS:
        raise DataError(f"unknown vision task {task!r}; known: {', '.join(VISION_TASKS)}")
    arrays = VISION_TASKS[task](data_root)
    logger.debug("loaded %s: images %s, %d classes", task, arrays.images.shape, len(arrays.classes))
    return arrays
