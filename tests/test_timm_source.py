"""Plain state-dict experts over a timm architecture (``--base timm:NAME@FILE``): one-hot λ gives
each expert, and the exported ``merged.pt`` + head loads into ``timm.create_model`` alone."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")  # installed with open_clip_torch

from adamerge.core.merged_model import MergedModel  # noqa: E402
from adamerge.errors import ArchitectureError  # noqa: E402
from adamerge.run.export import write_merged_model_of  # noqa: E402
from adamerge.sources import SourceOptions, load_experts  # noqa: E402
from adamerge.storage.checkpoints import save_state_dict  # noqa: E402

ARCH = "test_efficientnet"  # timm's tiny test model
CLASSES = {"a": 3, "b": 5}


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    base = timm.create_model(ARCH, pretrained=False, num_classes=3).eval()
    save_state_dict(base.state_dict(), root / "base.safetensors")
    experts = {}
    for seed, (task, classes) in enumerate(CLASSES.items(), start=1):
        generator = torch.Generator().manual_seed(seed)
        expert = timm.create_model(ARCH, pretrained=False, num_classes=classes)
        state = {k: v.clone() for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        state = {k: (v + 0.02 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() and "running" not in k
                 else v for k, v in state.items()}
        state |= {k: v for k, v in expert.state_dict().items() if k.startswith("classifier.")}
        experts[task] = root / f"{task}.safetensors"
        save_state_dict(state, experts[task])
    return root, experts


def test_one_hot_gives_each_expert_and_the_export_loads_in_timm(timm_files, tmp_path):
    root, paths = timm_files
    options = SourceOptions(head_pattern=r"^classifier\.", batchnorm="base", base_kwargs={"num_classes": 3})
    experts = load_experts(f"timm:{ARCH}@{root / 'base.safetensors'}", {t: str(p) for t, p in paths.items()}, options)
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", constraint="none", init=0.0,
                         heads=experts.heads, batchnorm="base")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for k, task in enumerate(experts.tasks):
        merged.coefficients.set_values(torch.nn.functional.one_hot(torch.tensor(k), 2).float()[:, None])
        with torch.no_grad():
            ours = merged(images, task)
            alone = experts.expert_model(task).eval()(images)
        assert ours.shape == (2, CLASSES[task])
        torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    merged.coefficients.set_values(torch.tensor([[0.4], [0.6]]))
    write_merged_model_of(tmp_path, merged, experts.export)
    reloaded = timm.create_model(ARCH, pretrained=False, num_classes=CLASSES["b"]).eval()
    reloaded.load_state_dict(torch.load(tmp_path / "merged.pt") | torch.load(tmp_path / "heads" / "b.pt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), merged(images, "b"), atol=1e-5, rtol=1e-5)


def test_unknown_timm_model_is_named():
    with pytest.raises(ArchitectureError, match="timm has no model 'no_such_net'"):
        load_experts("timm:no_such_net@base.pt", {"a": "a.pt"})
