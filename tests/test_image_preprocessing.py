"""Image size and normalisation: from the options, the model's metadata or the data, and logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from adamerge.data.image_preprocessing import (
    IMAGENET_MEAN,
    ImagePreprocessing,
    model_metadata,
    resolve_image_preprocessing,
)
from adamerge.data.images import list_images
from adamerge.run.datamodules import build_datamodule
from adamerge.sources import load_file_experts
from adamerge.sources.architectures import build_architecture
from tests.conftest import HEAD, write_images


def _logged(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "adamerge.data.image_preprocessing")


def test_torchvision_metadata_is_its_weights_evaluation_transform():
    model = build_architecture("torchvision:resnet18")
    found = model_metadata("torchvision:resnet18", model)
    import torchvision

    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert found.size == (224, 224) and found.resize == 256 and found.mean == tuple(preset.mean)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    torch.testing.assert_close(found.transform()(image), preset(image), rtol=0, atol=1e-6)  # the library's own transform


def test_timm_metadata_is_its_pretrained_cfg():
    timm = pytest.importorskip("timm")
    model = build_architecture("timm:resnet18")
    found = model_metadata("timm:resnet18", model)
    config = model.pretrained_cfg
    assert found.size == tuple(config["input_size"][1:]) and found.interpolation == config["interpolation"]
    assert found.resize == int(config["input_size"][1] / config["crop_pct"]) and found.std == tuple(config["std"])
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (260, 300, 3), dtype=np.uint8))
    torch.testing.assert_close(found.transform()(image), reference(image), rtol=0, atol=1e-5)


def test_import_path_model_with_timm_style_config_and_without_any():
    model = build_architecture("tests.tiny:tiny_convnet")
    assert model_metadata("tests.tiny:tiny_convnet", model) is None
    model.pretrained_cfg = {"input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.8}
    found = model_metadata("tests.tiny:tiny_convnet", model)
    assert found.size == (40, 40) and found.resize == 50 and found.mean == (0.5, 0.5, 0.5)


def test_data_size_is_used_when_the_model_has_no_metadata(tmp_path, caplog):
    write_images(tmp_path / "calib" / "a", 3, seed=0, size=20)
    write_images(tmp_path / "calib" / "b", 3, seed=1, size=20)
    with caplog.at_level(logging.INFO, logger="adamerge.data.image_preprocessing"):
        chosen = resolve_image_preprocessing(None, list_images(tmp_path / "calib"))
    assert chosen.size is None and chosen.mean == IMAGENET_MEAN
    log = _logged(caplog)
    assert "all 6 calibration images are 20x20" in log and "--image-mean" in log  # a warning: normalisation is a guess
    image = Image.open(next((tmp_path / "calib" / "a").iterdir()))
    assert chosen.transform()(image).shape == (3, 20, 20)


def test_fallback_224_warns_and_option_overrides(tmp_path, caplog):
    write_images(tmp_path / "a", 2, seed=0, size=20)
    write_images(tmp_path / "b", 2, seed=1, size=28)
    paths = list_images(tmp_path)
    with caplog.at_level(logging.INFO, logger="adamerge.data.image_preprocessing"):
        chosen = resolve_image_preprocessing(None, paths)
    assert chosen.size == (224, 224)
    assert any(r.levelno == logging.WARNING and "fallback" in r.getMessage() for r in caplog.records)
    chosen = resolve_image_preprocessing(None, paths, size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert chosen.size == (32, 32) and chosen.mean == (0.5, 0.5, 0.5) and chosen.normalisation_origin.startswith("--image-mean")


def test_metadata_wins_over_data_and_a_mismatch_is_named(tmp_path, caplog):
    write_images(tmp_path / "a", 3, seed=0, size=32)
    metadata = model_metadata("torchvision:resnet18", build_architecture("torchvision:resnet18"))
    with caplog.at_level(logging.INFO, logger="adamerge.data.image_preprocessing"):
        chosen = resolve_image_preprocessing(metadata, list_images(tmp_path))
    assert chosen.size == (224, 224)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "32x32" in warning[0] and "--image-size 32" in warning[0]
    explicit = resolve_image_preprocessing(metadata, list_images(tmp_path), size=32)
    assert explicit.size == (32, 32) and explicit.resize is None and explicit.mean == metadata.mean


def test_datamodule_of_an_import_path_model_uses_the_calibration_size(tiny_setup, caplog):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    with caplog.at_level(logging.INFO, logger="adamerge.data.image_preprocessing"):
        data = build_datamodule(experts, tiny_setup.calib, eval_dir=tiny_setup.eval, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.calibration_loaders()["alpha"]))
    assert batch.shape == (4, 3, 12, 12)  # the images' own 12 px, not 224
    assert "calibration images are 12x12" in _logged(caplog)


def test_describe_names_sizes_and_origins():
    text = ImagePreprocessing(size=(224, 224), resize=256, origin="x's metadata").describe()
    assert "224x224 px (shorter side resized to 256, centre crop)" in text and "x's metadata" in text
