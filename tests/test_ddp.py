"""Lightning DDP (2 CPU processes, gloo) learns the coefficients a single process learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "ddp_fit.py"


def run(workdir, out, *args) -> dict:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(workdir), str(out), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_setup, tmp_path):
    workdir = tiny_setup.base.parent
    single = run(workdir, tmp_path / "single.json", "--devices", "1", "--batch-size", "8")
    ddp = run(workdir, tmp_path / "ddp.json", "--devices", "2", "--strategy", "ddp", "--batch-size", "4")

    # DDP: each rank sees 4 images per task, gradients averaged = one process with 8 images per task
    torch.testing.assert_close(torch.tensor(ddp["coefficients"]), torch.tensor(single["coefficients"]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.tensor(single["coefficients"]), torch.tensor(0.3)), "coefficients did not move"

    # the task vectors and heads are neither all-reduced nor broadcast
    assert ddp["wrapped"] == "DistributedDataParallel"
    assert any(name.startswith("merged.task_vectors.tv_") for name in ddp["ignored"])
    assert not any("task_vectors" in name or "heads" in name for name in ddp["broadcast_buffers"])


@pytest.mark.slow
def test_ddp_trains_wemoe_routers_as_one_process(tiny_setup, tmp_path):
    workdir = tiny_setup.base.parent
    single = run(workdir, tmp_path / "single.json", "--devices", "1", "--batch-size", "8", "--method", "wemoe")
    ddp = run(workdir, tmp_path / "ddp.json", "--devices", "2", "--strategy", "ddp", "--batch-size", "4", "--method", "wemoe")

    # per-input routing: each rank's 4 inputs route as in the batch of 8; averaged router gradients
    torch.testing.assert_close(torch.tensor(ddp["routers"]), torch.tensor(single["routers"]), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(torch.tensor(single["routers"]), torch.tensor(single["initial_routers"])), "routers did not move"
    assert any(name.startswith("merged.task_vectors.tv_") for name in ddp["ignored"])  # the deltas the routers mix
