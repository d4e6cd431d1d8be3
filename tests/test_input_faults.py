"""Faulty inputs found by fault probes of ``adamerge fit`` / ``adamerge merge``: image files that
PIL refuses late (decompression bombs, truncated pixel data), expert tensors of the wrong dtype,
head patterns that leave nothing to merge, pickled whole-module experts (``--trust-pickles``) and
checkpoints lacking BatchNorm's ``num_batches_tracked`` buffers (saved by an older PyTorch).

Every case is built here as a real file (tiny PNGs, tiny models) and read by the real loaders.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adamerge.core.task_vectors import TaskVectors, check_expert_keys
from adamerge.data.images import LabelledImageFolder, UnlabeledImageFolder, build_image_transform
from adamerge.errors import AdamergeError, CheckpointError, DataError, IncompatibleExpertError
from adamerge.sources import SourceOptions, load_experts
from adamerge.sources.file import load_expert_module, load_file_experts, select_heads
from adamerge.storage.checkpoints import load_state_dict
from tests.conftest import HEAD, perturbed_expert
from tests.tiny import tiny_convnet

ARCH = "tests.tiny:tiny_convnet"
TRANSFORM = build_image_transform(8)

# --------------------------------------------------------------------------------------------
# PNG files built byte by byte


def png_bytes(size: int = 12, seed: int = 0) -> bytes:
    """A valid RGB PNG of random pixels (``size`` x ``size``)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``[(chunk type, chunk data)]`` of a PNG file."""
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file of these chunks, each with a correct CRC."""
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return out


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (CRC fixed)."""
    return png_from_chunks(
        [(k, struct.pack(">II", width, height) + b[8:] if k == b"IHDR" else b) for k, b in png_chunks(png_bytes())]
    )


def truncated_idat_png() -> bytes:
    """A well-formed PNG (every chunk's CRC right, IEND present) whose compressed pixel data stops
    half-way: ``Image.verify()`` (which checks chunks, not pixels) accepts it, decoding fails."""
    chunks = png_chunks(png_bytes(16, seed=7))
    return png_from_chunks([(k, b[: len(b) // 2] if k == b"IDAT" else b) for k, b in chunks])


def image_folder(root: Path, bad: dict[str, bytes], good: int = 2, classes: int | None = None) -> Path:
    """``good`` valid PNGs (per class with ``classes``) plus the ``bad`` files (in class 0)."""
    for c in range(classes or 1):
        folder = root / str(c) if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(good):
            (folder / f"good{i}.png").write_bytes(png_bytes(seed=10 * c + i))
    for name, data in bad.items():
        (root / "0" / name if classes else root / name).write_bytes(data)
    return root


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# 1. decompression bombs


def test_decompression_bomb_is_skipped_with_warning(tmp_path, caplog):
    folder = image_folder(tmp_path / "calib", {"bomb.png": bomb_png()})
    with caplog.at_level(logging.WARNING):
        dataset = UnlabeledImageFolder(folder, TRANSFORM)
    assert [p.name for p in dataset.paths] == ["good0.png", "good1.png"]
    warning = next(r.getMessage() for r in caplog.records if "bomb.png" in r.getMessage())
    assert "30000x30000" in warning
    assert all(dataset[i].shape == (3, 8, 8) for i in range(len(dataset)))


def test_decompression_bomb_in_labelled_folder_and_alone(tmp_path, caplog):
    folder = image_folder(tmp_path / "eval", {"bomb.png": bomb_png()}, classes=2)
    with caplog.at_level(logging.WARNING):
        dataset = LabelledImageFolder(folder, TRANSFORM)
    assert len(dataset) == 4 and "bomb.png" in messages(caplog)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(DataError, match="no decodable image"):
        UnlabeledImageFolder(alone, TRANSFORM)


def test_large_image_below_the_bomb_limit_still_decodes(tmp_path, caplog, monkeypatch):
    """Between 1x and 2x ``MAX_IMAGE_PIXELS`` PIL only warns: the image is used, even where
    warnings are errors (``python -W error``), and the warning is logged once, naming the file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 12x12 image (144 pixels) is "large"
    folder = image_folder(tmp_path / "calib", {}, good=2)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        dataset = UnlabeledImageFolder(folder, TRANSFORM)
        items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 2 and all(item.shape == (3, 8, 8) for item in items)
    assert "good0.png" in messages(caplog) and "12x12" in messages(caplog)


# --------------------------------------------------------------------------------------------
# 2. images that pass Image.verify() but do not decode


def test_truncated_png_passes_verify_but_not_load():
    data = truncated_idat_png()
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # the scenario: the cheap check accepts it
    with pytest.raises(OSError), Image.open(io.BytesIO(data)) as image:
        image.load()


def test_truncated_png_is_skipped_in_calibration(tmp_path, caplog):
    folder = image_folder(tmp_path / "calib", {"cut.png": truncated_idat_png()})
    with caplog.at_level(logging.WARNING):
        dataset = UnlabeledImageFolder(folder, TRANSFORM)
    assert [p.name for p in dataset.paths] == ["good0.png", "good1.png"]
    assert "cut.png" in messages(caplog)
    batch = torch.stack([dataset[i] for i in range(len(dataset))])  # no DataError mid-training
    assert batch.shape == (2, 3, 8, 8)


def test_truncated_png_is_skipped_in_evaluation(tmp_path, caplog):
    folder = image_folder(tmp_path / "eval", {"cut.png": truncated_idat_png()}, classes=2)
    with caplog.at_level(logging.WARNING):
        dataset = LabelledImageFolder(folder, TRANSFORM)
    assert [(p.name, label) for p, label in dataset.samples] == [
        ("good0.png", 0), ("good1.png", 0), ("good0.png", 1), ("good1.png", 1)
    ]  # fmt: skip
    assert "cut.png" in messages(caplog)
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 0, 1, 1]


def test_folder_of_only_truncated_images_is_refused(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "cut.png").write_bytes(truncated_idat_png())
    with pytest.raises(DataError, match="no decodable image"):
        UnlabeledImageFolder(folder, TRANSFORM)
    (folder / "0").mkdir()
    (folder / "0" / "cut.png").write_bytes(truncated_idat_png())
    with pytest.raises(DataError, match="no decodable image"):
        LabelledImageFolder(folder, TRANSFORM)


# --------------------------------------------------------------------------------------------
# tiny experts as files


def tiny_files(tmp_path: Path, save=torch.save, strip: tuple[str, ...] = ()) -> tuple[Path, dict[str, Path]]:
    """A tiny base and two experts written with ``save(state_dict, path)``, less keys ending with ``strip``."""
    torch.manual_seed(0)
    base = tiny_convnet()

    def write(state: dict[str, torch.Tensor], path: Path) -> Path:
        save({k: v for k, v in state.items() if not k.endswith(strip)} if strip else state, path)
        return path

    base_path = write(dict(base.state_dict()), tmp_path / "base.pt")
    experts = {
        task: write(perturbed_expert(base, classes, seed), tmp_path / f"{task}.pt")
        for seed, (task, classes) in enumerate({"alpha": 3, "beta": 4}.items(), start=1)
    }
    return base_path, experts


# --------------------------------------------------------------------------------------------
# 3. expert dtypes


def test_integer_expert_tensor_of_a_float_base_is_refused(tmp_path):
    base_path, experts = tiny_files(tmp_path)
    state = torch.load(experts["beta"], weights_only=True)
    state["3.weight"] = (state["3.weight"] * 100).to(torch.int64)
    torch.save(state, experts["beta"])
    with pytest.raises(IncompatibleExpertError) as caught:
        load_file_experts(ARCH, base_path, experts, head_pattern=HEAD)
    message = str(caught.value)
    assert "'beta" in message and "'3.weight'" in message and "int64" in message and "float32" in message
    base_state = torch.load(base_path, weights_only=True)
    with pytest.raises(IncompatibleExpertError, match=r"'3\.weight'.*int64.*float32"):
        check_expert_keys(base_state, state, "beta", [r"8.weight", "8.bias"])


def test_integer_head_tensor_is_refused_too(tmp_path):
    base_path, experts = tiny_files(tmp_path)
    state = torch.load(experts["alpha"], weights_only=True)
    state["8.bias"] = torch.zeros(3, dtype=torch.int32)
    torch.save(state, experts["alpha"])
    with pytest.raises(IncompatibleExpertError, match=r"'8\.bias'.*int32"):
        load_file_experts(ARCH, base_path, experts, head_pattern=HEAD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_experts_of_a_float32_base_are_accepted(tmp_path, dtype):
    base_path, experts = tiny_files(tmp_path)
    full = {task: torch.load(path, weights_only=True) for task, path in experts.items()}
    for task, state in full.items():  # num_batches_tracked stays int64, as in the base
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, experts[task])
    loaded = load_file_experts(ARCH, base_path, experts, head_pattern=HEAD)
    base_state = torch.load(base_path, weights_only=True)
    name = "3.weight"
    expected = full["beta"][name].to(dtype).float() - base_state[name]
    assert torch.allclose(loaded.task_vectors.task_delta(name, "beta"), expected)
    assert full["beta"]["1.num_batches_tracked"].dtype == torch.int64


# --------------------------------------------------------------------------------------------
# 4. head patterns that leave nothing to merge


@pytest.mark.parametrize("pattern", [".", "weight|bias"])
def test_head_pattern_leaving_nothing_to_merge_is_refused(tmp_path, pattern):
    base_path, experts = tiny_files(tmp_path)
    with pytest.raises(AdamergeError, match="--head-pattern") as caught:
        load_file_experts(ARCH, base_path, experts, head_pattern=pattern)
    message = str(caught.value)
    matched = sum(1 for n in torch.load(base_path, weights_only=True) if re.search(pattern, n))
    assert repr(pattern) in message and f"{matched} " in message


def test_select_heads_refuses_a_pattern_matching_every_tensor():
    names = ["0.weight", "0.bias", "1.weight"]
    with pytest.raises(AdamergeError, match=r"'\.' matches all 3 tensors"):
        select_heads(names, ".")
    assert select_heads(names, r"^0\.") == ["0.weight", "0.bias"]


def test_task_vectors_refuse_zero_merged_tensors():
    with pytest.raises(AdamergeError, match="no merged tensor"):
        TaskVectors(["a", "b"], {})
    base = tiny_convnet().state_dict()
    with pytest.raises(AdamergeError, match="no merged tensor"):
        TaskVectors.from_states(base, {"a": base}, [])


# --------------------------------------------------------------------------------------------
# 5. --trust-pickles for plain files


def save_module(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` the way the task-vectors code does: the whole module, pickled."""
    model = tiny_convnet(num_classes=state["8.bias"].shape[0])
    model.load_state_dict(state)
    torch.save(model, path)


def test_pickled_module_expert_is_refused_without_trust(tmp_path):
    base_path, experts = tiny_files(tmp_path)
    save_module(torch.load(experts["alpha"], weights_only=True), experts["alpha"])
    for attempt in (
        lambda: load_file_experts(ARCH, base_path, experts, head_pattern=HEAD),
        lambda: load_expert_module(ARCH, experts["alpha"]),
        lambda: load_state_dict(experts["alpha"]),
    ):
        with pytest.raises(CheckpointError) as caught:
            attempt()
        message = str(caught.value)
        assert "alpha.pt" in message and "--trust-pickles true" in message and "state_dict()" in message
        assert "weights_only" not in message and "\n" not in message


def test_pickled_module_expert_is_accepted_with_trust(tmp_path, caplog):
    base_path, experts = tiny_files(tmp_path)
    plain = load_file_experts(ARCH, base_path, experts, head_pattern=HEAD)
    states = {task: torch.load(path, weights_only=True) for task, path in experts.items()}
    save_module(states["alpha"], experts["alpha"])
    model = tiny_convnet(num_classes=4)
    model.load_state_dict(states["beta"])
    torch.save({"model": model, "epoch": 3}, experts["beta"])  # a training checkpoint wrapping the module
    with caplog.at_level(logging.WARNING):
        trusted = load_experts(f"{ARCH}@{base_path}", experts, SourceOptions(head_pattern=HEAD, trust_pickles=True))
    assert "alpha.pt" in messages(caplog) and "runs code" in messages(caplog)
    assert trusted.task_vectors.names == plain.task_vectors.names
    for name, vectors in plain.task_vectors.items():
        assert torch.equal(trusted.task_vectors[name], vectors)
    for task in experts:
        assert all(torch.equal(trusted.heads[task][n], plain.heads[task][n]) for n in plain.heads[task])
        alone = trusted.expert_model(task).state_dict()  # the expert rebuilt alone loads the same way
        assert all(torch.equal(alone[k], v) for k, v in states[task].items())


# --------------------------------------------------------------------------------------------
# 6. checkpoints without BatchNorm's num_batches_tracked


def test_base_and_experts_without_num_batches_tracked_are_accepted(tmp_path):
    base_path, experts = tiny_files(tmp_path, strip=("num_batches_tracked",))
    saved = torch.load(base_path, weights_only=True)
    assert not any(k.endswith("num_batches_tracked") for k in saved)
    reference = tiny_convnet()
    reference.load_state_dict(saved, strict=True)  # torch itself accepts it
    loaded = load_file_experts(ARCH, base_path, experts, head_pattern=HEAD)
    ours = loaded.model.state_dict()
    assert list(ours) == list(reference.state_dict())
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())
    assert int(ours["1.num_batches_tracked"]) == 0
    alone = loaded.expert_model("beta").state_dict()
    assert int(alone["4.num_batches_tracked"]) == 0 and alone["8.weight"].shape == (4, 16)


def test_check_expert_keys_allows_only_the_batchnorm_counter_missing():
    base = tiny_convnet().state_dict()
    expert = {k: v for k, v in base.items() if not k.endswith("num_batches_tracked")}
    check_expert_keys(base, expert, "alpha", [])
    del expert["1.running_mean"]
    with pytest.raises(IncompatibleExpertError, match=r"1\.running_mean"):
        check_expert_keys(base, expert, "alpha", [])
