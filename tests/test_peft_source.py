"""peft LoRA adapters as experts through the Hugging Face source (``--experts NAME=peft:DIR``):
each adapter reproduced by one-hot λ (against peft's own forward), mixed LoRA + full fine-tune sets,
``adamerge fit`` end to end with the transformers export reloaded without adamerge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from adamerge.cli import main  # noqa: E402
from adamerge.core.merged_model import MergedModel  # noqa: E402
from adamerge.core.task_vectors import FactoredDelta  # noqa: E402
from adamerge.errors import IncompatibleExpertError  # noqa: E402
from adamerge.sources import load_experts  # noqa: E402
from tests.test_hf_source import CLASSES, HFSetup, hf, one_hot  # noqa: E402,F401  (the tiny BERT fixture)

ADAPTERS = {"polarity": (2, 4, ["query", "value"]), "intent": (3, 8, ["query", "key", "dense"])}


def save_adapter(base: Path, folder: Path, num_labels: int, rank: int, targets: list[str], seed: int) -> None:
    """A LoRA adapter (SEQ_CLS: the classifier in modules_to_save) with seeded non-zero factors."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, target_modules=targets,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapters(hf: HFSetup) -> dict[str, Path]:
    folders = {}
    for seed, (task, (labels, rank, targets)) in enumerate(ADAPTERS.items(), start=11):
        folders[task] = hf.root / f"lora-{task}"
        save_adapter(hf.base, folders[task], labels, rank, targets, seed)
        (hf.calib / task).mkdir(exist_ok=True)
        (hf.calib / task / "part.txt").write_text("the movie is good\nnot a great plot\nthe team won\nbad film\n")
        rows = [{"text": "the cat is very good", "label": i % labels} for i in range(6)]
        (hf.eval / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folders


def peft_logits(hf: HFSetup, folder: Path, labels: int, batch: dict) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(hf.base, num_labels=labels)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, folder).eval()(**batch).logits


def test_each_adapter_is_reproduced_and_stays_low_rank(hf, adapters):
    experts = load_experts(f"hf:{hf.base}", {t: f"peft:{p}" for t, p in adapters.items()})
    assert experts.tasks == tuple(ADAPTERS) and experts.num_classes == {"polarity": 2, "intent": 3}
    store = experts.task_vectors
    assert any(isinstance(part, FactoredDelta) for _, part in store.parts())
    assert store.nbytes() < store.dense_nbytes() / 4  # factors, not K dense copies
    merged = MergedModel(experts.model, store, granularity="task", constraint="none", init=0.0, heads=experts.heads)
    batch = hf.batch()
    for k, (task, (labels, _, _)) in enumerate(ADAPTERS.items()):
        merged.coefficients.set_values(one_hot(k, len(ADAPTERS))[:, None])
        with torch.no_grad():
            ours = merged(batch, task=task)
        torch.testing.assert_close(ours, peft_logits(hf, adapters[task], labels, batch), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            alone = experts.expert_model(task)(**batch).logits
        torch.testing.assert_close(alone, ours, atol=1e-5, rtol=1e-5)


def test_mixed_lora_and_full_fine_tunes(hf, adapters):
    references = {t: f"peft:{p}" for t, p in adapters.items()} | {t: f"hf:{p}" for t, p in hf.experts.items()}
    experts = load_experts(f"hf:{hf.base}", references)
    assert experts.tasks == tuple(references)
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none", init=0.0,
                         heads=experts.heads)
    batch = hf.batch()
    k = experts.tasks.index("topic")
    merged.coefficients.set_values(one_hot(k, len(references))[:, None].expand(-1, merged.layout.num_groups))
    full = AutoModelForSequenceClassification.from_pretrained(hf.experts["topic"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch, task="topic"), full(**batch).logits, atol=1e-5, rtol=1e-5)
    lam = merged.coefficients.raw
    lam.data.fill_(0.3)
    merged(batch, task="polarity").logsumexp(-1).sum().backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0
    assert all(p.grad is None for p in merged.model.parameters())


def test_fit_on_adapters_end_to_end_and_export_reloads(hf, adapters, tmp_path):
    output = tmp_path / "out"
    code = main(["fit", "--base", f"hf:{hf.base}", "--experts", *[f"{t}=peft:{p}" for t, p in adapters.items()],
                 "--calib", str(hf.calib), "--eval", str(hf.eval), "--steps", "3", "--batch-size", "2",
                 "--output", str(output), "--accelerator", "cpu", "--progress-bar", "false", "--max-length", "16"])
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]["expert (alone)"]) == {*ADAPTERS, "average"}
    experts = load_experts(f"hf:{hf.base}", {t: f"peft:{p}" for t, p in adapters.items()})
    table = json.loads((output / "coefficients.json").read_text())
    probe = MergedModel(experts.model, experts.task_vectors, granularity="layer", heads=experts.heads)
    lam = torch.tensor([[table[t][g] for g in probe.layout.group_names] for t in probe.tasks])
    merged = MergedModel(experts.model, experts.task_vectors, granularity="layer", constraint="none", init=lam,
                         heads=experts.heads)
    batch = hf.batch()
    for task, (labels, _, _) in ADAPTERS.items():
        reloaded = AutoModelForSequenceClassification.from_pretrained(output / "tasks" / task).eval()
        assert reloaded.config.num_labels == labels
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, merged(batch, task=task), atol=1e-5, rtol=0)


def test_adapter_over_another_base_is_refused(hf, adapters, tmp_path, caplog):
    from transformers import BertConfig, BertModel

    from tests.test_hf_source import TINY

    wider = BertModel(BertConfig(vocab_size=len(hf.tokenizer.get_vocab()), **(TINY | {"hidden_size": 48}))).eval()
    wider.save_pretrained(tmp_path / "wider")
    hf.tokenizer.save_pretrained(tmp_path / "wider")
    save_adapter(tmp_path / "wider", tmp_path / "foreign", 2, 4, ["query"], seed=3)
    with pytest.raises(IncompatibleExpertError, match="foreign"):
        load_experts(f"hf:{hf.base}", {"polarity": f"peft:{adapters['polarity']}", "x": f"peft:{tmp_path / 'foreign'}"})
    code = main(["fit", "--base", f"hf:{hf.base}", "--experts", f"a=peft:{adapters['polarity']}",
                 f"b=peft:{tmp_path / 'foreign'}", "--calib", str(hf.calib), "--steps", "1",
                 "--output", str(tmp_path / "never")])
    assert code == 2 and not (tmp_path / "never").exists()
