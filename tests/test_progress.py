"""The console of a run: one line per stage, progress lines without a terminal, no Lightning noise."""

from __future__ import annotations

import logging
import warnings

from adamerge.cli import main
from tests.test_cli import fit_args


def test_fit_logs_every_stage_progress_and_no_third_party_noise(tiny_setup, tmp_path, caplog, capsys):
    args = [*fit_args(tiny_setup, tmp_path / "run", "--eval", str(tiny_setup.eval)), "--steps", "10", "--progress-bar", "true"]
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert main(args) == 0
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("adamerge")]
    for stage in ("loading experts and data: ", "evaluating the experts alone: ", "evaluating the start: ",
                  "fitting: 10 steps in ", "evaluating the merge: ", "writing: "):
        assert sum(m.startswith(stage) for m in ours) == 1, (stage, ours)
    progress = [m for m in ours if m.startswith("fitting: step ")]
    assert len(progress) == 9 and all("/10, loss " in m for m in progress)  # steps 1-9: pytest's stderr is no terminal
    assert sum(m.startswith("per-task accuracy") for m in ours) == 1  # the table once
    assert any(m.startswith("stage times: ") and "total" in m for m in ours)
    everything = "\n".join(r.getMessage() for r in caplog.records) + capsys.readouterr().err
    for noise in ("💡 Tip", "litlogger", "smaller than the logging interval", "LeafSpec", "`Trainer.fit` stopped"):
        assert noise not in everything, noise
    assert not [w for w in caught if "LeafSpec" in str(w.message) or "logging interval" in str(w.message)]
