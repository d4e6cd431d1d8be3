"""Readers for real data sets stored under a data root (see :mod:`adamerge.datasets.vision`)."""

from adamerge.datasets.vision import (
    VISION_TASKS,
    ImageArrays,
    load_vision_task,
    read_idx,
    read_idx_pair,
    read_image_npz,
    read_libsvm_images,
    resolve_data_root,
)

__all__ = [
    "VISION_TASKS",
    "ImageArrays",
    "load_vision_task",
    "read_idx",
    "read_idx_pair",
    "read_image_npz",
    "read_libsvm_images",
    "resolve_data_root",
]
