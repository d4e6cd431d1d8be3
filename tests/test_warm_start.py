"""``fit --start-from NAME``: a learned method starts at a static merge (its rewritten task vectors,
scaled so that λ = init is that merge), on images and on causal LMs with LoRA experts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from adamerge.cli import main
from adamerge.core.task_vectors import FactoredDelta, LowRankFactor, TaskVectors
from tests.test_causal_lm import PROMPTS, build, save_lora
from tests.test_data_merges import image_args, image_setup  # noqa: F401  (a fixture)


def test_scaled_task_vectors_scale_each_task_and_keep_lora_factored():
    torch.manual_seed(0)
    dense = torch.randn(3, 4, 5)
    factored = FactoredDelta((4, 5), 3, dense_tasks=[1], dense=torch.randn(1, 4, 5),
                             factors=[LowRankFactor(0, torch.randn(4, 2), torch.randn(2, 5), 2.0),
                                      LowRankFactor(2, torch.randn(4, 1), torch.randn(1, 5), 0.5)])  # fmt: skip
    vectors = TaskVectors(["a", "b", "c"], {"w": dense, "f": factored})
    factors = torch.tensor([0.5, 3.0, -2.0])
    scaled = vectors.scaled(factors)
    assert scaled.is_factored("f") and scaled.nbytes() == vectors.nbytes()
    for name in ("w", "f"):
        for k in range(3):
            torch.testing.assert_close(scaled.task_delta(name, k), factors[k] * vectors.task_delta(name, k))
    torch.testing.assert_close(vectors.task_delta("f", 0), factored.task_delta(0))  # the original is unchanged
    with pytest.raises(Exception, match=r"expected \(3,\)"):
        vectors.scaled(torch.ones(2))


AT_START = ("--steps", "1", "--lr", "1e-12")  # one step that cannot move λ: the exported merge is the start


def fit_args(folder, experts, method: str, output: str, *extra: str) -> list[str]:
    """``adamerge fit`` of the image MLP of :mod:`tests.test_data_merges` (the merge command's arguments)."""
    args = image_args(folder, experts, method, "--calib", str(folder / "calib"), *extra)
    args[0] = "fit"
    args[args.index("--output") + 1] = str(folder / output)
    return args + ["--batch-size", "4", "--eval-experts", "false", "--progress-bar", "false"]


@pytest.mark.parametrize(("start", "method"), [("regmean", "expert-merging"), ("tsv-m", "adamerging")])
def test_the_start_is_the_static_merge_and_the_fit_moves_from_it(image_setup, start, method):
    """A step that cannot move λ exports the static merge's own weights (λ = init of a sigmoid and of a clamp);
    a few steps move λ away from init."""
    folder, base, experts = image_setup
    assert main(image_args(folder, experts, start, "--calib", str(folder / "calib"))) == 0
    static = torch.load(folder / start / "merged.pt", weights_only=True)
    assert main(fit_args(folder, experts, method, "zero", "--start-from", start, *AT_START, "--granularity", "layer")) == 0
    exported = torch.load(folder / "zero" / "merged.pt", weights_only=True)
    for name in static:
        torch.testing.assert_close(exported[name], static[name], atol=1e-6, rtol=1e-5, msg=name)
    metrics = json.loads((folder / "zero" / "metrics.json").read_text())
    assert metrics["method"]["start_from"] == start
    assert main(fit_args(folder, experts, method, "moved", "--start-from", start, "--steps", "4", "--lr", "0.05",
                         "--holdout", "0", "--granularity", "layer")) == 0  # fmt: skip
    table = json.loads((folder / "moved" / "coefficients.json").read_text())
    init = metrics["method"]["init"]
    assert max(abs(v - init) for row in table.values() for v in row.values()) > 1e-3


def test_bad_starts_are_refused_with_one_line_before_anything_is_written(image_setup, caplog):
    folder, _, experts = image_setup
    cases = [
        (["--start-from", "adamerging"], "--start-from adamerging: expected a static merge"),
        (["--start-from", "no-such-merge"], "--start-from 'no-such-merge': expected one of"),
        (["--start-from", "regmean", "--start-options", "{density: 0.2}"], "--start-options ['density']: not options of 'regmean'"),
        (["--start-from", "ties", "--init", "0"], "pass --init"),
    ]
    for extra, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="adamerge"):
            assert main(fit_args(folder, experts, "adamerging", "refused", *extra)) == 2, extra
        assert message in caplog.text, (extra, caplog.text)
        assert not (folder / "refused").exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(fit_args(folder, experts, "adamerging++", "refused", "--start-from", "ties")) == 2
    assert "TIES trim" in caplog.text and not (folder / "refused").exists()


def test_lora_experts_start_from_task_arithmetic_without_densifying(tmp_path, caplog):
    """Expert Merging (λ₀ = 0.1, sigmoid) from task arithmetic at 0.3 on LoRA adapters: the factors
    stay factored (scale only), and a step that cannot move λ exports θ₀ + 0.3 Σ τ_k, as ``adamerge merge`` does."""
    setup = build(tmp_path, "llama")
    adapters = []
    for seed, task in enumerate(PROMPTS, start=1):
        save_lora(setup.base, tmp_path / f"lora-{task}", seed, ["q_proj", "v_proj"])
        adapters.append(f"{task}=peft:{tmp_path / f'lora-{task}'}")
    common = ["--base", f"hf:{setup.base}", "--experts", *adapters, "--max-length", "16"]
    assert main(["merge", "--method", "task-arithmetic", *common, "--output", str(tmp_path / "ta")]) == 0
    caplog.set_level(logging.INFO, logger="adamerge")
    assert main(["fit", "--method", "expert-merging", *common, "--calib", str(setup.calib),
                 "--start-from", "task-arithmetic", *AT_START, "--batch-size", "4", "--eval-experts", "false",
                 "--output", str(tmp_path / "fit")]) == 0  # fmt: skip
    assert "densifying" not in caplog.text and "task vectors scaled by 3, 3" in caplog.text
    static = AutoModelForCausalLM.from_pretrained(tmp_path / "ta" / "model").state_dict()
    fitted = AutoModelForCausalLM.from_pretrained(tmp_path / "fit" / "model").state_dict()
    for name, tensor in static.items():
        torch.testing.assert_close(fitted[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
