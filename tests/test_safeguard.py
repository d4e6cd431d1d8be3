"""The held-out safeguard: the split, the score, keeping the best λ (start included), the CLI."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from adamerge.cli import main
from adamerge.core.merged_model import MergedModel
from adamerge.data.images import MultiTaskImageDataModule
from adamerge.objectives.task_objectives import Entropy, Objective
from adamerge.run.module import MergingModule
from adamerge.run.safeguard import KeepBestCoefficients, held_out_batches
from adamerge.sources import load_file_experts
from tests.conftest import HEAD, write_images
from tests.test_cli import fit_args


def _data(setup, **kwargs) -> MultiTaskImageDataModule:
    data = MultiTaskImageDataModule(setup.calib, ["alpha", "beta"], batch_size=4, image_size=12, **kwargs)
    data.setup("fit")
    return data


def _positions(view) -> set[int]:
    return set(view.indices)


def test_holdout_is_disjoint_seeded_and_off_by_default(tiny_setup):
    for task in ("alpha", "beta"):
        write_images(tiny_setup.calib / task, 40, seed=7)  # 40 images per task (the 12 are overwritten)
    plain = _data(tiny_setup)
    assert not plain.held_out and len(plain.calibration["alpha"]) == 40
    held = _data(tiny_setup, holdout=0.25)
    again = _data(tiny_setup, holdout=0.25)
    for task in ("alpha", "beta"):
        train, out = _positions(held.calibration[task]), _positions(held.held_out[task])
        assert len(out) == 10 and len(train) == 30 and not train & out
        assert out == _positions(again.held_out[task])
    assert _positions(held.held_out["alpha"]) != _positions(held.held_out["beta"])  # each task its own draw
    limited = _data(tiny_setup, holdout=0.25, limit_per_task=5)
    assert _positions(limited.held_out["alpha"]) == _positions(held.held_out["alpha"])
    assert len(limited.calibration["alpha"]) == 5 and not _positions(limited.calibration["alpha"]) & _positions(held.held_out["alpha"])
    assert set(held_out_batches(held.holdout_loaders())) == {"alpha", "beta"}


def test_holdout_never_takes_every_input(tiny_setup):
    for task in ("alpha", "beta"):
        for path in sorted((tiny_setup.calib / task).iterdir())[1:]:
            path.unlink()  # one image per task
    data = _data(tiny_setup, holdout=0.5)
    assert not data.held_out and len(data.calibration["alpha"]) == 1


class Diverge(Objective):
    """Drives every λ up without bound (a regulariser of -Σλ; the task losses carry no signal):
    the merge becomes the base plus ever larger task vectors and agrees less and less with the
    experts at every step."""

    def forward(self, task, outputs, batch):
        return 0.0 * outputs.logits.sum()

    def regularization(self, coefficients):
        return -coefficients.sum()


def _fit(setup, tmp_path, objective, steps: int, lr: float = 200.0):
    for task in ("alpha", "beta"):
        write_images(setup.calib / task, 60, seed=3)
    L.seed_everything(0)
    loaded = load_file_experts("tests.tiny:tiny_convnet", setup.base, setup.experts, HEAD)
    merged = MergedModel(loaded.model, loaded.task_vectors, "layer", "none", 0.3, loaded.heads, "per-task")
    module = MergingModule(merged, objective=objective, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    data = _data(setup, holdout=0.5)
    guard = KeepBestCoefficients(held_out_batches(data.holdout_loaders()), loaded.expert_model, every=2)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0, callbacks=[guard],
    )
    start = merged.coefficients.raw.detach().clone()
    trainer.fit(module, datamodule=data)
    return guard, merged, start


def test_training_that_only_hurts_keeps_the_start(tiny_setup, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="adamerge.run.safeguard"):
        guard, merged, start = _fit(tiny_setup, tmp_path, Diverge(), steps=8, lr=1.0)
    scores = {step: row["mean"] for step, row in guard.history.items()}
    assert sorted(scores) == [0, 2, 4, 6, 8]
    assert all(scores[s] < scores[0] for s in (2, 4, 6, 8))  # training made the held-out agreement worse ...
    assert guard.best_step == 0 and max(scores, key=lambda s: (scores[s], -s)) == 0
    torch.testing.assert_close(merged.coefficients.raw, start, rtol=0, atol=0)  # ... so the start is kept
    assert "the start is kept" in caplog.text


def test_the_kept_coefficients_are_the_best_scored(tiny_setup, tmp_path):
    guard, merged, _ = _fit(tiny_setup, tmp_path, Entropy(), steps=8)
    best = max(guard.history.values(), key=lambda row: row["mean"])["mean"]
    assert guard.history[guard.best_step]["mean"] == best
    torch.testing.assert_close(merged.coefficients.raw, guard.best_state["raw"], rtol=0, atol=0)
    from tests.test_module import trainer as plain_trainer

    # re-scoring the kept λ gives the recorded score (the score is a function of λ alone)
    module = MergingModule(merged)
    plain_trainer(tmp_path / "t", 1)  # a Trainer is not needed for scoring; device comes from the module
    assert guard.score(module)["mean"] == pytest.approx(best)


def test_fit_records_the_safeguard_and_holdout_zero_turns_it_off(tiny_setup, tmp_path, caplog):
    for task in ("alpha", "beta"):
        write_images(tiny_setup.calib / task, 30, seed=5)
    assert main(fit_args(tiny_setup, tmp_path / "on", "--holdout", "0.2")) == 0
    record = json.loads((tmp_path / "on" / "metrics.json").read_text())["safeguard"]["stage 1"]
    assert set(record["agreement"]) == {"0", "1", "2", "3"} and record["kept_step"] in (0, 1, 2, 3)  # every max(1, steps // 10)
    assert main(fit_args(tiny_setup, tmp_path / "off", "--holdout", "0")) == 0
    assert "safeguard" not in json.loads((tmp_path / "off" / "metrics.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(fit_args(tiny_setup, tmp_path / "bad", "--holdout", "1")) == 2
    assert "--holdout 1.0: expected a share" in caplog.text and not (tmp_path / "bad").exists()


def test_few_shot_holdout_never_takes_a_shot(tiny_setup):
    for task in ("alpha", "beta"):
        write_images(tiny_setup.calib / task, 24, seed=4, classes=3)  # 8 labelled images per class
    data = _data(tiny_setup, holdout=0.25, shots=5)
    plain = _data(tiny_setup, shots=5)
    for task in ("alpha", "beta"):
        shots, held = _positions(data.calibration[task]), _positions(data.held_out[task])
        assert shots == _positions(plain.calibration[task]) and len(shots) == 15  # the same 5 shots per class
        assert len(held) == 6 and not shots & held
    exact = _data(tiny_setup, holdout=0.25, shots=8)  # every image is a shot: nothing is held out
    assert not exact.held_out and len(exact.calibration["alpha"]) == 24
