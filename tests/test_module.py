"""The LightningModule in a user's own Trainer: small checkpoints, resume, evaluation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from adamerge.core.merged_model import MergedModel
from adamerge.data.images import MultiTaskImageDataModule
from adamerge.errors import AdamergeError
from adamerge.run.module import MergingModule
from adamerge.sources import load_file_experts
from tests.conftest import HEAD


def build(setup, tasks=None, batchnorm="base"):
    experts = {t: p for t, p in setup.experts.items() if tasks is None or t in tasks}
    loaded = load_file_experts("tests.tiny:tiny_convnet", setup.base, experts, HEAD, batchnorm)
    merged = MergedModel(loaded.model, loaded.task_vectors, "layer", "clamp", 0.3, loaded.heads, batchnorm)
    data = MultiTaskImageDataModule(setup.calib, merged.tasks, eval_dir=setup.eval, batch_size=4, image_size=12, shuffle=False)
    return MergingModule(merged, sources=loaded.sources), data


def trainer(tmp_path, steps, **kwargs):
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0, **kwargs,
    )


class RecordStart(L.Callback):
    """Records λ and the Adam step count when training (re)starts."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "raw"):
            self.raw = pl_module.merged.coefficients.raw.detach().clone()
            state = trainer.optimizers[0].state_dict()["state"]
            self.adam_step = int(state[0]["step"]) if state else 0


def test_resume_from_checkpoint_restores_coefficients_and_optimizer(tiny_setup, tmp_path):
    L.seed_everything(0)
    first, data = build(tiny_setup)
    run = trainer(tmp_path / "b", 3)
    run.fit(first, datamodule=data)
    path = tmp_path / "three.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["state_dict"]) == ["merged.coefficients.raw"]  # λ only, never the weights
    assert path.stat().st_size < 100_000
    assert not torch.allclose(first.merged.coefficients.raw, torch.tensor(0.3))

    resumed, data = build(tiny_setup)
    recorder = RecordStart()
    again = trainer(tmp_path / "c", 6, enable_checkpointing=False, callbacks=[recorder])
    again.fit(resumed, datamodule=data, ckpt_path=path)
    torch.testing.assert_close(recorder.raw, first.merged.coefficients.raw, rtol=0, atol=0)
    assert recorder.adam_step == 3 and again.global_step == 6
    assert not torch.equal(resumed.merged.coefficients.raw, first.merged.coefficients.raw)


def test_checkpoint_for_other_tasks_is_refused(tiny_setup, tmp_path):
    module, data = build(tiny_setup)
    run = trainer(tmp_path, 1)
    run.fit(module, datamodule=data)
    path = tmp_path / "one.ckpt"
    run.save_checkpoint(path)
    other, data = build(tiny_setup, tasks={"alpha"})
    with pytest.raises(AdamergeError, match="checkpoint coefficients are for tasks"):
        trainer(tmp_path, 2).fit(other, datamodule=data, ckpt_path=path)


def test_test_loop_reports_per_task_accuracy_matching_a_manual_count(tiny_setup, tmp_path):
    module, data = build(tiny_setup, batchnorm="reestimate")
    trainer(tmp_path, 1).test(module, datamodule=data, verbose=False)
    results = module.results["test"]
    for k, task in enumerate(module.tasks):
        plain = module.merged.merge_and_unload(task)
        correct = total = 0
        for inputs, labels in data.evaluation_loaders()[k]:
            correct += int((plain(inputs).argmax(-1) == labels).sum())
            total += labels.numel()
        assert results[task] == pytest.approx(correct / total)
    assert results["average"] == pytest.approx(sum(results[t] for t in module.tasks) / 2)


@pytest.mark.parametrize(("batchnorm", "batch_statistics"), [("reestimate", True), ("per-task", True), ("base", False)])
@pytest.mark.parametrize("test_first", [False, True])
def test_training_steps_use_batch_statistics_under_the_reestimating_policies(tiny_setup, tmp_path, batchnorm, batch_statistics, test_first):
    """Lightning keeps modules in the mode they were built in; BatchNorm must still train (or not) as the policy says."""
    module, data = build(tiny_setup, batchnorm=batchnorm)
    if test_first:  # the evaluation loop's eval() / mode restore must not leak into training
        trainer(tmp_path / "t", 1).test(module, datamodule=data, verbose=False)
    seen: list[bool] = []
    layer = module.merged.model[1]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.training) if torch.is_grad_enabled() else None)
    before = layer.running_mean.clone()
    trainer(tmp_path, 2).fit(module, datamodule=data)
    handle.remove()
    assert seen and set(seen) == {batch_statistics}
    assert not module.merged.model[0].training  # everything else (dropout and the like) stays in eval mode
    if not batch_statistics:
        torch.testing.assert_close(layer.running_mean, before)
