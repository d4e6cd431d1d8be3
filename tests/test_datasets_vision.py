"""Readers of the real image data under ../shared/data: shapes, dtypes, labels, errors."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np
import pytest

from adamerge.datasets import VISION_TASKS, ImageArrays, load_vision_task, read_idx, read_libsvm_images
from adamerge.datasets.vision import DATA_ROOT_ENV, resolve_data_root
from adamerge.errors import DataError

pytestmark = pytest.mark.lab  # the demo / data-set readers / notebooks, not the library

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "images").is_dir(), reason=f"real data not found at {DATA_ROOT}")

# task: (rows, image shape, samples per class or None when unbalanced)
EXPECTED = {
    "mnist": (10_000, (28, 28), None),
    "fashion_mnist": (10_000, (28, 28), 1_000),
    "kannada_mnist": (10_000, (28, 28), 1_000),
    "usps": (2_007, (16, 16), None),
    "cifar10": (20_000, (32, 32, 3), 2_000),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, ImageArrays]:
    return {task: load_vision_task(task, DATA_ROOT) for task in VISION_TASKS}


def test_registry_lists_the_five_tasks():
    assert set(VISION_TASKS) == set(EXPECTED)


@needs_data
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_reader_shapes_dtypes_and_labels(loaded, task):
    rows, shape, per_class = EXPECTED[task]
    arrays = loaded[task]
    assert arrays.images.shape == (rows, *shape)
    assert arrays.images.dtype == np.uint8 and arrays.labels.dtype == np.int64
    assert arrays.labels.shape == (rows,)
    assert len(arrays.classes) == 10 and len(set(arrays.classes)) == 10
    counts = np.bincount(arrays.labels, minlength=10)
    assert counts.size == 10 and counts.min() > 0
    if per_class is not None:
        assert (counts == per_class).all()
    assert arrays.images.min() == 0 and arrays.images.max() == 255


@needs_data
def test_known_labels_and_class_names(loaded):
    assert loaded["mnist"].labels[:5].tolist() == [7, 2, 1, 0, 4]  # the official t10k order
    assert loaded["usps"].labels[0] == 9  # file label 10 is digit 9
    assert loaded["cifar10"].classes[:2] == ["airplane", "automobile"]
    assert loaded["fashion_mnist"].classes[0] == "T-shirt/top"


@needs_data
def test_usps_pixels_map_minus_one_to_black(loaded):
    images = loaded["usps"].images
    assert np.median(images[:, 0, 0]) == 0  # corners are background, -1 in the file
    assert (images == 255).any()


def test_missing_file_names_file_and_root(tmp_path):
    with pytest.raises(DataError, match=r"images/mnist/t10k-images-idx3-ubyte\.gz") as error:
        load_vision_task("mnist", tmp_path)
    assert str(tmp_path) in str(error.value)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="known: mnist"):
        load_vision_task("imagenet", DATA_ROOT)


def test_data_root_falls_back_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert resolve_data_root(None) == tmp_path.resolve()
    assert resolve_data_root(DATA_ROOT) == DATA_ROOT.resolve()


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    with gzip.open(path, "wb") as stream:
        stream.write(header + bytes(5))  # 8 pixels declared, 5 present
    with pytest.raises(DataError, match="header declares shape"):
        read_idx(path)


def test_read_libsvm_handles_sparse_rows(tmp_path):
    (tmp_path / "tiny.bz2").write_bytes(bz2.compress(b"1 1:1 4:0\n3 2:-1 3:1.0\n"))
    arrays = read_libsvm_images(tmp_path, "tiny.bz2", (2, 2), ["a", "b", "c"])
    assert arrays.labels.tolist() == [0, 2]
    assert arrays.images.tolist() == [[[255, 128], [128, 128]], [[128, 0], [255, 128]]]


def test_image_arrays_validate_labels():
    with pytest.raises(DataError, match="labels span"):
        ImageArrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 3]), ["a", "b"])
