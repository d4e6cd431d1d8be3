"""MultiTaskTextDataModule: layouts, tokenisation, dynamic padding, few-shot subsets and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adamerge.data.texts import LengthGroupedBatches, MultiTaskTextDataModule, PadCollator, read_labelled, read_unlabeled
from adamerge.errors import DataError
from adamerge.objectives.task_objectives import as_task_batch

WORDS = "the a cat dog is good bad movie film great not very plot actor sport game news world".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def sentence(i: int, length: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    calib, evaluation = tmp_path / "calib", tmp_path / "eval"
    (calib / "movies").mkdir(parents=True)
    (calib / "movies" / "a.txt").write_text("the movie is good\n\n   \nthe film is very very bad\r\n")
    write_jsonl(calib / "movies" / "b.jsonl", [{"text": "a great plot"}, {"text": "not good", "label": 7}])
    (calib / "news" / "deep").mkdir(parents=True)
    (calib / "news" / "deep" / "c.txt").write_text("\n".join(sentence(i, 3 + i % 5) for i in range(9)))
    write_jsonl(evaluation / "movies.jsonl", [{"text": sentence(i, 4), "label": i % 2} for i in range(10)])
    write_jsonl(evaluation / "news" / "part.jsonl", [{"text": sentence(i, 6), "label": i % 3} for i in range(7)])
    return calib, evaluation


def test_reading_skips_blank_lines_and_keeps_origins(folders):
    calib, evaluation = folders
    records = read_unlabeled(calib, "movies")
    assert records.texts == ["the movie is good", "the film is very very bad", "a great plot", "not good"]
    assert records.origins[1].endswith("a.txt:4") and records.origins[3].endswith("b.jsonl:2")
    assert records.labels is None
    labelled = read_labelled(evaluation, "news")
    assert labelled.labels == [i % 3 for i in range(7)]


def test_batches_are_tokenised_truncated_and_padded_per_batch(folders, tokenizer):
    calib, evaluation = folders
    data = MultiTaskTextDataModule(calib, ["movies", "news"], tokenizer, max_length=6, eval_dir=evaluation,
                                   batch_size=2, eval_batch_size=4, shuffle=False)
    loaders = data.calibration_loaders()
    first = next(iter(loaders["movies"]))
    assert set(first) == {"input_ids", "token_type_ids", "attention_mask"}
    expected = tokenizer(["the movie is good", "the film is very very bad"], truncation=True, max_length=6, padding=True)
    assert first["input_ids"].tolist() == expected["input_ids"]  # longest of the batch: 6 (truncated)
    assert first["attention_mask"].tolist() == expected["attention_mask"]
    second = list(loaders["movies"])[1]
    assert second["input_ids"].shape == (2, 5)  # "a great plot" -> CLS a great plot SEP: padded to this batch only
    assert second["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]
    assert as_task_batch(first).inputs["input_ids"] is first["input_ids"]
    inputs, labels = next(iter(data.evaluation_loaders()[1]))
    assert inputs["input_ids"].shape == (4, 6) and labels.tolist() == [0, 1, 2, 0]  # equal lengths: file order
    assert dict(data.class_counts()) == {"movies": 2, "news": 3}
    assert data.tasks == ["movies", "news"] and len(data.val_dataloader()) == 2


def test_evaluation_batches_group_texts_by_length_and_cover_each_once(tmp_path, tokenizer):
    lengths = [7, 1, 4, 9, 2, 2, 6, 3, 8, 5, 1]
    rows = [{"text": sentence(i, n), "label": i % 3} for i, n in enumerate(lengths)]
    write_jsonl(tmp_path / "eval" / "news.jsonl", rows)
    (tmp_path / "calib" / "news").mkdir(parents=True)
    (tmp_path / "calib" / "news" / "a.txt").write_text("the news\n")
    data = MultiTaskTextDataModule(tmp_path / "calib", ["news"], tokenizer, max_length=64,
                                   eval_dir=tmp_path / "eval", eval_batch_size=4)  # fmt: skip
    seen, widths = [], []
    for inputs, labels in data.evaluation_loaders()[0]:
        widths.append(inputs["input_ids"].shape[1])
        seen += [(tuple(ids[mask.bool()].tolist()), int(label)) for ids, mask, label in
                 zip(inputs["input_ids"], inputs["attention_mask"], labels)]  # fmt: skip
    expected = [(tuple(tokenizer(r["text"])["input_ids"]), r["label"]) for r in rows]
    assert sorted(seen) == sorted(expected)  # every text once, with its own label
    assert widths == sorted(widths) and widths[-1] == max(lengths) + 2  # [CLS] ... [SEP]
    assert sum(widths[:-1]) < (len(widths) - 1) * widths[-1]  # the short texts share short batches


def test_training_loader_is_round_robin_with_cycling(folders, tokenizer):
    calib, _ = folders
    data = MultiTaskTextDataModule(calib, ["movies", "news"], tokenizer, batch_size=2, seed=3)
    loader = data.train_dataloader()
    steps = [batch for batch, _, _ in loader]
    assert len(steps) == 5  # news: 9 texts / 2 -> 5 batches; movies (4 texts) cycles
    assert all(set(step) == {"movies", "news"} for step in steps)
    twin = MultiTaskTextDataModule(calib, ["movies", "news"], tokenizer, batch_size=2, seed=3)
    again = [batch for batch, _, _ in twin.train_dataloader()]
    assert all(torch.equal(a["news"]["input_ids"], b["news"]["input_ids"]) for a, b in zip(steps, again))


@pytest.mark.parametrize("n, batch_size, megabatch", [(500, 8, 50), (37, 4, 3), (5, 8, 50), (64, 1, 2)])
def test_length_grouped_batches_cover_each_item_once_and_pad_less(n, batch_size, megabatch):
    lengths = torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(0), megabatch)
    first, second = list(sampler), list(sampler)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(n)) and len(epoch) == len(sampler)
        assert all(1 <= len(batch) <= batch_size for batch in epoch)
        # within a mega-batch the items are ranked by length: every batch is a contiguous length range
        assert all(lengths[a] >= lengths[b] for batch in epoch for a, b in zip(batch, batch[1:]))
    assert first != second or n <= batch_size  # reshuffled every epoch
    again = list(LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(0), megabatch))
    assert again == first  # seeded
    if batch_size > 1 and n >= 4 * batch_size:  # pad tokens: far fewer than uniformly shuffled batches
        uniform = torch.randperm(n, generator=torch.Generator().manual_seed(1)).split(batch_size)
        padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
        assert padded(first) < 0.85 * padded([b.tolist() for b in uniform])


def test_length_grouped_batches_refuse_bad_sizes():
    with pytest.raises(DataError, match="batch size 0"):
        LengthGroupedBatches([3, 4], 0, torch.Generator())


def test_training_loader_groups_by_length_when_asked(tmp_path, tokenizer):
    calib = tmp_path / "calib"
    (calib / "news").mkdir(parents=True)
    texts = [sentence(i, 1 + (7 * i) % 23) for i in range(60)]
    (calib / "news" / "t.txt").write_text("\n".join(texts))
    plain = MultiTaskTextDataModule(calib, ["news"], tokenizer, batch_size=6, seed=2, max_length=32)
    grouped = MultiTaskTextDataModule(calib, ["news"], tokenizer, batch_size=6, seed=2, max_length=32, group_by_length=True)

    def epoch(data):
        return [batch["news"] for batch, _, _ in data.train_dataloader()]

    plain_batches, grouped_batches = epoch(plain), epoch(grouped)
    seen = lambda batches: sorted(tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"]))  # noqa: E731
    assert seen(grouped_batches) == seen(plain_batches)  # the same texts, each once per epoch
    tokens = lambda batches: sum(b["input_ids"].numel() for b in batches)  # noqa: E731
    assert tokens(grouped_batches) < 0.8 * tokens(plain_batches)
    unshuffled = grouped.calibration_loaders(shuffle=False)["news"]  # BatchNorm re-estimation order: the file's
    assert [len(b["input_ids"]) for b in unshuffled] == [6] * 10


def test_few_shot_and_indices(folders, tokenizer):
    _, evaluation = folders
    data = MultiTaskTextDataModule(
        evaluation, ["movies", "news"], tokenizer, batch_size=64, shots=2, with_index=True, seed=1
    )
    batch = next(iter(data.calibration_loaders(shuffle=False)["news"]))
    assert set(batch) == {"inputs", "labels", "index"}
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1, 2, 2] and batch["index"].tolist() == list(range(6))
    task_batch = as_task_batch(batch)
    assert task_batch.size == 6 and task_batch.labels is batch["labels"]
    same = MultiTaskTextDataModule(evaluation, ["movies", "news"], tokenizer, shots=2, seed=1)
    assert same.calibration_loaders()["news"].dataset.indices == data.calibration["news"].indices
    limited = MultiTaskTextDataModule(folders[0], ["movies", "news"], tokenizer, limit_per_task=3, with_index=True)
    assert len(limited.calibration_loaders()["news"].dataset) == 3
    assert set(next(iter(limited.calibration_loaders()["news"]))) == {"inputs", "index"}


def test_left_padding_and_single_file_layout(tmp_path, tokenizer):
    (tmp_path / "topic.txt").write_text("cat\nthe dog is good\n")
    collate = PadCollator(pad_token_id=0, padding_side="left")
    data = MultiTaskTextDataModule(tmp_path, ["topic"], tokenizer, batch_size=2, shuffle=False)
    data.collate = collate
    batch = next(iter(data.calibration_loaders()["topic"]))
    assert batch["input_ids"][0].tolist()[:3] == [0, 0, 0] and batch["attention_mask"][0].tolist()[-3:] == [1, 1, 1]


def _task_folder(root: Path, name: str, text: str) -> None:
    (root / "t").mkdir()
    (root / "t" / name).write_text(text)


@pytest.mark.parametrize(
    ("write_calib", "write_eval", "message"),
    [
        (None, None, "calibration data of task 't' not found"),
        (lambda c: _task_folder(c, "x.txt", "\n \n"), None, "x.txt: holds no non-blank line"),
        (lambda c: _task_folder(c, "x.csv", "a\n"), None, "holds no .txt or .jsonl file"),
        (lambda c: _task_folder(c, "x.jsonl", '{"text": "a"}\n{"text": \n'), None, "x.jsonl:2: not valid JSON"),
        (lambda c: _task_folder(c, "x.jsonl", '{"txt": "a"}\n'), None, "x.jsonl:1: field 'text' is missing"),
        (None, lambda e: write_jsonl(e / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": -1}]),
         "t.jsonl:2: label -1 is out of range"),
        (None, lambda e: write_jsonl(e / "t.jsonl", [{"text": "a", "label": 5}]),
         "t.jsonl:1: label 5 is out of range (expected 0..2)"),
        (None, lambda e: write_jsonl(e / "t.jsonl", [{"text": "a", "label": "pos"}]), "field 'label' is 'pos'"),
        (None, lambda e: write_jsonl(e / "t.jsonl", [{"text": "a"}]), "field 'label' is missing"),
        (None, lambda e: (e / "t").mkdir(), "holds no .jsonl file"),
        (None, lambda e: None, "labelled data of task 't' not found"),
    ],
)
def test_bad_data_is_refused_naming_the_file(tmp_path, tokenizer, write_calib, write_eval, message):
    calib, evaluation = tmp_path / "calib", tmp_path / "eval"
    calib.mkdir()
    evaluation.mkdir()
    if write_calib is not None:
        write_calib(calib)
    if write_eval is not None:
        (calib / "t.txt").write_text("fine\n")  # valid calibration: the evaluation data is at fault
        write_eval(evaluation)
    data = MultiTaskTextDataModule(calib, ["t"], tokenizer, eval_dir=evaluation, num_classes={"t": 3})
    with pytest.raises(DataError, match=re.escape(message)):
        data.setup("fit")


def test_missing_calibration_root_and_bad_arguments(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        MultiTaskTextDataModule(tmp_path / "nope", ["t"], tokenizer)
    with pytest.raises(DataError, match="max-length"):
        MultiTaskTextDataModule(tmp_path, ["t"], tokenizer, max_length=0)
    with pytest.raises(DataError, match="tokenizer"):
        MultiTaskTextDataModule(tmp_path, ["t"], None)
