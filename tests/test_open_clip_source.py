"""The open_clip expert source on a tiny CLIP built offline: full / tower-only / pickled experts,
zero-shot heads from class-name files, one-hot λ against each expert, ``adamerge fit`` end to end,
the export reloaded by open_clip alone, and the refusals (pickles, class names, architecture)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from adamerge.cli import main
from adamerge.core.merged_model import MergedModel
from adamerge.errors import CheckpointError, DataError, IncompatibleExpertError
from adamerge.sources import SourceOptions, load_experts
from adamerge.sources.open_clip import MERGED_FILE, ZeroShotClassifier, load_open_clip_experts

ARCH = "TinyCLIP-adamerge-test"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OTHER_ARCH = "TinyCLIP-adamerge-test-wide"  # same layout, another tower width
CLASSES = {"a": ["0", "1", "2"], "b": ["x", "y"]}
QUICK = ["--steps", "3", "--batch-size", "4", "--eval-batch-size", "8", "--progress-bar", "false"]


class ImageEncoder(nn.Module):
    """Mimics task-vectors' ``src.modeling.ImageEncoder``: ``.model`` is a CLIP without its text
    transformer (``keep_lang=False``), plus preprocessing attributes; saved with ``torch.save(self)``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.model = clip
        self.train_preprocess = self.val_preprocess = None
        self.cache_dir = "/nonexistent"
        delattr(self.model, "transformer")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


@dataclass
class ClipSetup:
    root: Path
    base: Path
    files: dict[str, Path]
    calib: Path
    eval: Path

    def spec(self) -> str:
        return f"open_clip:{ARCH}@{self.base}"


def _register(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wide = json.loads(json.dumps(CONFIG))
    wide["vision_cfg"]["width"] = 96
    for name, config in ((ARCH, CONFIG), (OTHER_ARCH, wide)):
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")


def _clip(seed: int = 0, arch: str = ARCH) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None).eval()


def _expert_state(base: nn.Module, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """The base CLIP's state with seeded noise on every image-tower tensor (text tower unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, tensor in state.items():
        if name.startswith("visual.") and tensor.is_floating_point():
            state[name] = tensor + scale * torch.randn(tensor.shape, generator=generator)
    return state


def _images(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory) -> ClipSetup:
    root = tmp_path_factory.mktemp("openclip")
    _register(root / "configs")
    base = _clip(0)
    files = {"base": root / "base.pt"}
    torch.save(base.state_dict(), files["base"])
    full_a, full_b = _expert_state(base, 1), _expert_state(base, 2)
    files["a"] = root / "a_clip.pt"  # full CLIP state dict
    torch.save(full_a, files["a"])
    files["b"] = root / "b_tower.pt"  # image tower only, no prefix
    torch.save({k[len("visual."):]: v for k, v in full_b.items() if k.startswith("visual.")}, files["b"])
    files["b_prefixed"] = root / "b_visual.pt"  # image tower only, ``visual.`` prefix
    torch.save({k: v for k, v in full_b.items() if k.startswith("visual.")}, files["b_prefixed"])
    clip_a, clip_b = _clip(0), _clip(0)
    clip_a.load_state_dict(full_a)
    clip_b.load_state_dict(full_b)
    files["a_pickle"] = root / "a_encoder.pt"  # torch.save(ImageEncoder) as task-vectors does
    torch.save(ImageEncoder(clip_a), files["a_pickle"])
    files["b_pickle"] = root / "b_visual_module.pt"  # a pickled visual tower
    torch.save(clip_b.visual, files["b_pickle"])
    files["base_tower"] = root / "base_tower.pt"
    torch.save(base.visual.state_dict(), files["base_tower"])
    files["other"] = root / "other_arch.pt"
    torch.save(_clip(3, OTHER_ARCH).state_dict(), files["other"])

    calib, evaluation = root / "calib", root / "eval"
    for k, (task, names) in enumerate(CLASSES.items()):
        _images(calib / task, 6, seed=10 + k)
        for j, name in enumerate(names):
            _images(evaluation / task / name, 2, seed=20 + 10 * k + j)
    (calib / "a" / "classnames.txt").write_text("zero\none\ntwo\n")  # inside the task folder
    (calib / "b.classnames.txt").write_text("ex\n\nwhy\n")  # beside it (blank lines ignored)
    (calib / "b" / "templates.txt").write_text("a photo of a {c}.\n{c}\n")
    return ClipSetup(root, files["base"], files, calib, evaluation)


def _options(setup: ClipSetup, **kwargs) -> SourceOptions:
    return SourceOptions(calib=kwargs.pop("calib", setup.calib), eval=kwargs.pop("eval", setup.eval), **kwargs)


def _reference_logits(clip_file: Path, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits computed by open_clip alone from a full CLIP checkpoint."""
    clip = open_clip.create_model(ARCH, pretrained=str(clip_file)).eval()
    with torch.no_grad():
        features = clip.encode_image(images, normalize=True)
        return clip.logit_scale.exp() * features @ head.T


def test_heads_and_one_hot_coefficients_equal_each_expert(clip_setup):
    files = {"a": str(clip_setup.files["a"]), "b": str(clip_setup.files["b"])}
    experts = load_experts(clip_setup.spec(), files, _options(clip_setup))
    assert isinstance(experts.model, ZeroShotClassifier) and experts.modality == "image"
    assert all(n.startswith("visual.") for n in experts.task_vectors.names)
    assert {t: h["head.weight"].shape for t, h in experts.heads.items()} == {"a": (3, 32), "b": (2, 32)}

    # heads: the base text tower through open_clip's own zero-shot builder
    base = open_clip.create_model(ARCH, pretrained=str(clip_setup.base)).eval()
    tokenizer = open_clip.get_tokenizer(ARCH)
    expected_a = open_clip.build_zero_shot_classifier(
        base, tokenizer=tokenizer, classnames=["zero", "one", "two"], templates=open_clip.SIMPLE_IMAGENET_TEMPLATES
    )
    expected_b = open_clip.build_zero_shot_classifier(
        base, tokenizer=tokenizer, classnames=["ex", "why"], templates=["a photo of a {}.", "{}"]
    )
    torch.testing.assert_close(experts.heads["a"]["head.weight"], expected_a.T)
    torch.testing.assert_close(experts.heads["b"]["head.weight"], expected_b.T)

    images = torch.randn(3, 3, 32, 32)
    merged = MergedModel(experts.model, experts.task_vectors, "task", constraint="none", init=0.0, heads=experts.heads)
    b_clip = clip_setup.root / "b_full_for_reference.pt"
    torch.save(base.state_dict() | torch.load(clip_setup.files["b_prefixed"], weights_only=True), b_clip)
    for k, (task, clip_file) in enumerate({"a": clip_setup.files["a"], "b": b_clip}.items()):
        merged.coefficients.set_values(F.one_hot(torch.tensor([k]), 2).float().T)  # (K, 1)
        with torch.no_grad():
            ours = merged(images, task)
            alone = experts.expert_model(task).eval()(images)
        head = experts.heads[task]["head.weight"]
        torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, _reference_logits(clip_file, head, images), rtol=1e-4, atol=1e-4)

    # open_clip's own preprocessing for the architecture
    transform = experts.image_transform
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_pickled_experts_need_trust_and_match_state_dicts(clip_setup, caplog):
    files = {"a": str(clip_setup.files["a"]), "b": str(clip_setup.files["b_prefixed"])}
    plain = load_open_clip_experts(clip_setup.spec(), files, _options(clip_setup))
    pickles = {"a": str(clip_setup.files["a_pickle"]), "b": str(clip_setup.files["b_pickle"])}
    with pytest.raises(CheckpointError, match="--trust-pickles"):
        load_open_clip_experts(clip_setup.spec(), pickles, _options(clip_setup))
    with caplog.at_level(logging.WARNING):
        trusted = load_open_clip_experts(clip_setup.spec(), pickles, _options(clip_setup, trust_pickles=True))
    assert not [r for r in caplog.records if "differ from the base" in r.getMessage()]
    for (name, ours), (_, theirs) in zip(trusted.task_vectors.items(), plain.task_vectors.items(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_pickle_whose_classes_are_missing_names_the_module(clip_setup, tmp_path):
    package = tmp_path / "tvrepo" / "adamerge_tv_src_missing"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "modeling.py").write_text(
        "import torch\n"
        "class ImageEncoder(torch.nn.Module):\n"
        "    def __init__(self, clip):\n"
        "        super().__init__()\n"
        "        self.model = clip\n"
    )
    sys.path.insert(0, str(package.parent))
    try:
        from adamerge_tv_src_missing.modeling import ImageEncoder as Missing

        torch.save(Missing(_clip(0)), tmp_path / "missing.pt")
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m.startswith("adamerge_tv_src_missing")]:
            del sys.modules[name]
    options = _options(clip_setup, trust_pickles=True)
    with pytest.raises(CheckpointError, match="module 'adamerge_tv_src_missing'.*PYTHONPATH"):
        load_open_clip_experts(clip_setup.spec(), {"a": str(tmp_path / "missing.pt")}, options)

    # a class an older open_clip had and this one lacks
    import open_clip.transformer as transformer

    class OldVisualTransformer(nn.Module):
        pass

    OldVisualTransformer.__module__, OldVisualTransformer.__qualname__ = "open_clip.transformer", "OldVisualTransformer"
    transformer.OldVisualTransformer = OldVisualTransformer
    try:
        torch.save(OldVisualTransformer(), tmp_path / "old.pt")
    finally:
        del transformer.OldVisualTransformer
    expected = "'OldVisualTransformer' from module 'open_clip.transformer'.*older open_clip"
    with pytest.raises(CheckpointError, match=expected):
        load_open_clip_experts(clip_setup.spec(), {"a": str(tmp_path / "old.pt")}, options)


def test_expert_from_another_pretrained_clip_is_flagged(clip_setup, tmp_path, caplog):
    state = torch.load(clip_setup.files["a"], weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"] + 0.1
    torch.save(state, tmp_path / "drifted.pt")
    with caplog.at_level(logging.WARNING, logger="adamerge"):
        load_open_clip_experts(clip_setup.spec(), {"a": str(tmp_path / "drifted.pt")}, _options(clip_setup))
    messages = [r.getMessage() for r in caplog.records]
    assert any("token_embedding.weight" in m and "another pretrained" in m for m in messages), messages


def test_tower_only_base_falls_back_to_the_file_source(clip_setup):
    experts = load_experts(
        f"open_clip:{ARCH}@{clip_setup.files['base_tower']}", {"b": str(clip_setup.files["b"])}, SourceOptions()
    )
    assert type(experts.model).__name__ == "VisionTransformer" and not experts.heads
    assert "conv1.weight" in experts.task_vectors.names


def test_image_preprocessing_comes_from_open_clip_config(clip_setup):
    """Size, mean, std and interpolation of the architecture's preprocess_cfg, for both sources."""
    files = {"a": str(clip_setup.files["a"]), "b": str(clip_setup.files["b"])}
    zero_shot = load_experts(clip_setup.spec(), files, _options(clip_setup)).image_preprocessing
    tower = load_experts(
        f"open_clip:{ARCH}@{clip_setup.files['base_tower']}", {"b": str(clip_setup.files["b"])}, SourceOptions()
    ).image_preprocessing
    for found in (zero_shot, tower):
        assert found.size == (32, 32) and found.interpolation == "bicubic"
        assert found.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN) and found.std == pytest.approx(open_clip.OPENAI_DATASET_STD)


def test_expert_of_another_architecture_is_refused(clip_setup):
    with pytest.raises(IncompatibleExpertError, match=r"'class_embedding' has shape \(96,\), the base has \(64,\)"):
        load_open_clip_experts(clip_setup.spec(), {"a": str(clip_setup.files["other"])}, _options(clip_setup))


def fit_args(
    setup: ClipSetup, output: Path, calib: Path | None = None, experts: dict[str, Path] | None = None
) -> list[str]:
    experts = experts or {"a": setup.files["a"], "b": setup.files["b"]}
    return [
        "fit",
        "--base", setup.spec(),
        "--experts", *(f"{t}={p}" for t, p in experts.items()),
        "--calib", str(calib or setup.calib),
        "--eval", str(setup.eval),
        "--output", str(output),
        *QUICK,
    ]  # fmt: skip


def test_fit_end_to_end_and_open_clip_reloads_the_export(clip_setup, tmp_path):
    output = tmp_path / "out"
    assert main(fit_args(clip_setup, output)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]["expert (alone)"]) == {"a", "b", "average"}
    assert metrics["files"]["merged"] == MERGED_FILE

    # adamerge's merged forward at the learned λ
    files = {"a": str(clip_setup.files["a"]), "b": str(clip_setup.files["b"])}
    experts = load_experts(clip_setup.spec(), files, _options(clip_setup))
    merged = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads)
    table = json.loads((output / "coefficients.json").read_text())
    values = [[table[t][g] for g in merged.layout.group_names] for t in merged.tasks]
    merged.coefficients.set_values(torch.tensor(values))
    merged.eval()

    # open_clip alone: the exported checkpoint, by file and as a local-dir model
    images = torch.randn(4, 3, 32, 32)
    by_file = open_clip.create_model(ARCH, pretrained=str(output / MERGED_FILE)).eval()
    by_dir = open_clip.create_model(f"local-dir:{output}").eval()
    base = open_clip.create_model(ARCH, pretrained=str(clip_setup.base))
    text = {k: v for k, v in by_file.state_dict().items() if not k.startswith("visual.")}
    assert text and all(torch.equal(v, base.state_dict()[k]) for k, v in text.items())
    with torch.no_grad():
        features = merged.merge_and_unload("a").visual(images)
        torch.testing.assert_close(by_file.encode_image(images), features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(by_dir.encode_image(images), features, rtol=1e-4, atol=1e-5)
        for task in CLASSES:
            head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
            assert head["classnames"] == {"a": ["zero", "one", "two"], "b": ["ex", "why"]}[task]
            logits = head["logit_scale"] * by_file.encode_image(images, normalize=True) @ head["weight"].T
            torch.testing.assert_close(logits, merged(images, task), rtol=1e-4, atol=1e-4)


def _fails(args: list[str], caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(args) == 2
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_bad_inputs_exit_2_and_write_nothing(clip_setup, tmp_path, caplog):
    calib = tmp_path / "calib"
    shutil.copytree(clip_setup.calib, calib)
    output = tmp_path / "out"

    (calib / "a" / "classnames.txt").write_text("zero\none\n")
    message = _fails(fit_args(clip_setup, output, calib), caplog)
    assert "classnames.txt lists 2 classes" in message and "has 3 class folders" in message, message

    (calib / "a" / "classnames.txt").write_text("\n\n")
    assert "is empty" in _fails(fit_args(clip_setup, output, calib), caplog)

    (calib / "a" / "classnames.txt").unlink()
    message = _fails(fit_args(clip_setup, output, calib), caplog)
    assert "no class names" in message and "a.classnames.txt" in message, message

    (calib / "a.classnames.txt").write_text("zero\none\ntwo\n")  # the beside-the-folder form
    (calib / "b" / "templates.txt").write_text("no placeholder\n")
    assert "lack the class-name placeholder" in _fails(fit_args(clip_setup, output, calib), caplog)
    (calib / "b" / "templates.txt").unlink()

    other = {"a": clip_setup.files["other"], "b": clip_setup.files["b"]}
    message = _fails(fit_args(clip_setup, output, calib, other), caplog)
    assert "expert 'a" in message and "has shape (96,), the base has (64,)" in message, message

    pickled = {"a": clip_setup.files["a_pickle"], "b": clip_setup.files["b"]}
    assert "--trust-pickles" in _fails(fit_args(clip_setup, output, calib, pickled), caplog)
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unknown_open_clip_architecture(clip_setup, tmp_path, caplog):
    args = fit_args(clip_setup, tmp_path / "o")
    args[args.index("--base") + 1] = f"open_clip:NoSuchClip@{clip_setup.base}"
    assert "open_clip has no model config 'NoSuchClip'" in _fails(args, caplog)


def test_data_error_is_a_data_error(clip_setup):
    with pytest.raises(DataError, match="no class names"):
        load_open_clip_experts(clip_setup.spec(), {"a": str(clip_setup.files["a"])}, SourceOptions())
