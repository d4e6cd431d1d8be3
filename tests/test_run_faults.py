"""Faults and bad options of `adamerge fit` / `adamerge merge` as a user meets them: unsafe task
names, signals, resume after a kill, concurrent runs, unwritable or full output locations,
option values, non-finite exports, evaluation folders that do not match the heads, `merge`
without `--calib`, `--help`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adamerge.cli import main
from adamerge.errors import AdamergeError
from adamerge.storage.output_folder import inside
from tests.conftest import HEAD, REPO, write_images
from tests.test_cli import fit_args, run_fails


def merge_args(setup, output: Path, *extra: str, experts: list[str] | None = None) -> list[str]:
    return [
        "merge", "--method", "average", "--batchnorm", "base",
        "--base", f"tests.tiny:tiny_convnet@{setup.base}",
        "--experts", *(experts if experts is not None else setup.expert_args()),
        "--head-pattern", HEAD, "--output", str(output), *extra,
    ]


def leftovers(folder: Path) -> list[str]:
    """Hidden staging / lock / resume entries left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- task names are paths ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,expected",
    [
        ("sub/victim", "not a plain file name"),
        ("../../evil", "not a plain file name"),
        ("/abs/victim", "not a plain file name"),
        ("..", "not a plain file name"),
        (".", "not a plain file name"),
        (".hidden", "not a plain file name"),
        ("a" * 300, "300 characters"),
        ("", "is empty"),
    ],
    ids=["separator", "dotdot", "absolute", "parent", "dot", "hidden", "overlong", "empty"],
)
def test_unsafe_task_names_are_refused_and_nothing_is_written(tiny_setup, tmp_path, caplog, name, expected):
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"keep me")
    output = tmp_path / "out"
    experts = [f"{name}={tiny_setup.experts['alpha']}", f"beta={tiny_setup.experts['beta']}"]
    message = run_fails(merge_args(tiny_setup, output, experts=experts), caplog)
    assert expected in message, message
    assert not output.exists() and victim.read_bytes() == b"keep me"
    assert leftovers(tmp_path) == []


def test_task_names_differing_only_by_case_are_refused(tiny_setup, tmp_path, caplog):
    experts = [f"Alpha={tiny_setup.experts['alpha']}", f"alpha={tiny_setup.experts['beta']}"]
    assert "differ only by case" in run_fails(merge_args(tiny_setup, tmp_path / "o", experts=experts), caplog)


def test_task_names_from_a_yaml_recipe_are_checked_too(tiny_setup, tmp_path, caplog):
    from adamerge.run.merge import MergeSettings, run_merge

    settings = MergeSettings(
        base=f"tests.tiny:tiny_convnet@{tiny_setup.base}", experts={"../evil": str(tiny_setup.experts["alpha"])},
        method="average", output=tmp_path / "o", batchnorm="base", head_pattern=HEAD,
    )
    with pytest.raises(AdamergeError, match="not a plain file name"):
        run_merge(settings)


def test_inside_refuses_paths_leaving_the_folder(tmp_path):
    assert inside(tmp_path, "heads", "mnist.pt") == tmp_path / "heads" / "mnist.pt"
    for parts in (("..", "x.pt"), ("/etc", "passwd"), ("heads", "..", "..", "x")):
        with pytest.raises(AdamergeError, match="not a path inside the output folder"):
            inside(tmp_path, *parts)


# -- permissions follow the umask -------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_output_permissions_follow_the_umask(tiny_setup, tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        assert main(fit_args(tiny_setup, tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    entries = [p for p in (tmp_path / "out").rglob("*")]
    assert entries
    for path in entries + [tmp_path / "out"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))


# -- signals and resume -----------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adamerge.cli", *args]


def _slow_fit(setup, output: Path, *extra: str) -> list[str]:
    args = fit_args(setup, output, "--steps", "60", "--checkpoint-every", "3", "--seed", "3", *extra)
    return _cli(*[a for a in args])


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def uneven_setup(tiny_setup):
    """Tasks of different sizes (20 and 12 images): their passes wrap at different steps."""
    write_images(tiny_setup.calib / "alpha", 20, 7)
    return tiny_setup


@pytest.mark.slow
def test_sigterm_exits_nonzero_leaves_no_output_and_resume_reaches_the_uninterrupted_result(uneven_setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    assert subprocess.run(_slow_fit(uneven_setup, full), env=env, capture_output=True, cwd=REPO).returncode == 0

    output = tmp_path / "cut"
    checkpoint = tmp_path / ".cut.resume" / "stage-1.ckpt"
    process = subprocess.Popen(_slow_fit(uneven_setup, output), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(checkpoint, process)
    process.send_signal(signal.SIGTERM)
    log, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, log
    assert "stopped by SIGTERM: nothing was written to" in log and "--resume continues from step" in log, log
    assert not output.exists()
    assert leftovers(tmp_path) == [".cut.resume"]  # no staging folder, no lock

    resumed = subprocess.run(_slow_fit(uneven_setup, output, "--resume"), env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted fit" in resumed.stderr
    assert json.loads((output / "coefficients.json").read_text()) == json.loads((full / "coefficients.json").read_text())
    assert leftovers(tmp_path) == []  # the resume state is gone once the fit completed


@pytest.mark.slow
def test_sigint_stops_like_sigterm(tiny_setup, tmp_path):
    output = tmp_path / "cut"
    checkpoint = tmp_path / ".cut.resume" / "stage-1.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_slow_fit(tiny_setup, output), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(checkpoint, process)
    process.send_signal(signal.SIGINT)
    log, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, log
    assert "stopped by SIGINT: nothing was written to" in log and "--resume continues from step" in log, log
    assert not output.exists() and leftovers(tmp_path) == [".cut.resume"]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_uninterrupted_result(uneven_setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ("--method", "expert-merging++", "--granularity", "layer", "--steps", "30")
    full = tmp_path / "full"
    first = subprocess.run(_slow_fit(uneven_setup, full, *extra), env=env, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]

    output = tmp_path / "cut"
    stage_two = tmp_path / ".cut.resume" / "stage-2.ckpt"
    process = subprocess.Popen(_slow_fit(uneven_setup, output, *extra), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(stage_two, process)
    process.kill()  # SIGKILL: no cleanup at all; the kernel drops the lock
    process.wait()
    resumed = subprocess.run(_slow_fit(uneven_setup, output, *extra, "--resume"), env=env, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output / "coefficients.json").read_text()) == json.loads((full / "coefficients.json").read_text())


def test_resume_refuses_other_settings_and_a_missing_state(tiny_setup, tmp_path, caplog):
    output = tmp_path / "o"
    assert "no interrupted fit to continue" in run_fails(fit_args(tiny_setup, output, "--resume"), caplog)
    folder = tmp_path / ".o.resume"
    folder.mkdir()
    (folder / "settings.yaml").write_text("steps: 999\n")
    message = run_fails(fit_args(tiny_setup, output, "--resume"), caplog)
    assert "the interrupted fit had other settings" in message and "steps" in message


def test_resume_state_is_discarded_when_the_inputs_are_bad(tiny_setup, tmp_path, caplog):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    tiny_setup.experts["beta"] = bad
    run_fails(fit_args(tiny_setup, tmp_path / "o"), caplog)
    assert leftovers(tmp_path) == []


# -- the output location ----------------------------------------------------------------------
def test_a_second_run_on_the_same_output_stops_at_once(tiny_setup, tmp_path, caplog):
    output = tmp_path / "o"
    with open(tmp_path / ".o.lock", "w") as held:  # a first run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        started = time.perf_counter()
        message = run_fails(fit_args(tiny_setup, output), caplog)
        assert time.perf_counter() - started < 5
    assert "is being written by another adamerge run (pid 4242" in message
    assert not output.exists() and leftovers(tmp_path) == [".o.lock"]


def test_output_dot_is_refused_even_with_overwrite(tiny_setup, tmp_path, caplog, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    message = run_fails(fit_args(tiny_setup, Path("."), "--overwrite"), caplog)
    assert "current folder" in message
    assert list(work.iterdir()) == [] and leftovers(tmp_path) == []


def test_output_holding_the_inputs_is_refused(tiny_setup, tmp_path, caplog):
    message = run_fails(fit_args(tiny_setup, tmp_path, "--overwrite", "true"), caplog)
    assert "current folder" in message or "holds the input" in message


def test_unwritable_output_is_refused_before_loading(tiny_setup, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = fit_args(tiny_setup, blocker / "out")
    args[args.index("--base") + 1] = f"tests.tiny:tiny_convnet@{tmp_path / 'no-such-base.pt'}"
    message = run_fails(args, caplog)
    assert "--output" in message and "no-such-base" not in message, message


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_file_system_is_refused_before_loading(tiny_setup, tmp_path, caplog):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        message = run_fails(fit_args(tiny_setup, folder / "out"), caplog)
        assert "read-only file system" in message, message


def test_full_disk_is_one_line_and_leaves_nothing(tiny_setup, tmp_path, caplog):
    with tmpfs(tmp_path / "small", "size=48k") as folder:
        message = run_fails(fit_args(tiny_setup, folder / "out"), caplog)
        assert "no space left on the device" in message or "is full" in message, message
        assert sorted(p.name for p in folder.iterdir()) == []


# -- option values ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--steps", "-5", "--steps -5: expected a number >= 1"),
        ("--batch-size", "0", "--batch-size 0: expected a number >= 1"),
        ("--batch-size", "-3", "--batch-size -3: expected a number >= 1"),
        ("--image-size", "0", "--image-size 0: expected a number >= 1"),
        ("--calib-limit", "0", "--calib-limit 0: expected a number >= 1"),
        ("--checkpoint-every", "-1", "--checkpoint-every -1: expected a number >= 0"),
        ("--lr", "0", "--lr 0.0: expected a finite number > 0"),
        ("--base-kwargs", "{nosuch: 7}", "--base-kwargs {'nosuch': 7}: the constructor"),
        ("--accelerator", "gpu", "--accelerator gpu"),
        ("--granularity", "chunk:x", "granularity 'chunk:x'"),
        ("--task-weights", "{gamma: 1.0}", "--task-weights: gamma is not a task"),
    ],
)
def test_bad_option_values_are_one_line(tiny_setup, tmp_path, caplog, flag, value, expected):
    if flag == "--accelerator" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    message = run_fails(fit_args(tiny_setup, tmp_path / "o", flag, value), caplog)
    assert expected in message, message
    assert leftovers(tmp_path) == []


def test_merge_checks_its_options_too(tiny_setup, tmp_path, caplog):
    assert "--batch-size 0" in run_fails(merge_args(tiny_setup, tmp_path / "o", "--batch-size", "0"), caplog)


# -- exports that would not load --------------------------------------------------------------
def test_non_finite_merge_is_not_written(tiny_setup, tmp_path, caplog):
    output = tmp_path / "o"
    message = run_fails(merge_args(tiny_setup, output, "--method", "task-arithmetic", "--options", "{scale: 1.0e+39}"), caplog)
    assert "refusing to write non-finite weights: tensor" in message, message
    assert not output.exists() and leftovers(tmp_path) == []


def test_non_finite_fit_is_not_written(tiny_setup, tmp_path, caplog):
    output = tmp_path / "o"
    # without the safeguard: it would keep the (finite) start, λ = 1e38, which is what training diverges from
    args = fit_args(tiny_setup, output, "--constraint", "none", "--init", "1e38", "--batchnorm", "base", "--holdout", "0")
    message = run_fails(args, caplog)
    assert "non-finite" in message, message
    assert not output.exists() and leftovers(tmp_path) == []


# -- evaluation folders against the heads -----------------------------------------------------
@pytest.mark.parametrize("change", ["missing", "extra"])
@pytest.mark.parametrize("command", ["fit", "merge"])
def test_eval_classes_must_match_the_head(tiny_setup, tmp_path, caplog, change, command):
    alpha = tiny_setup.eval / "alpha"  # 3 classes: 0, 1, 2
    if change == "missing":
        for image in (alpha / "2").iterdir():
            image.unlink()
        (alpha / "2").rmdir()
    else:
        write_images(alpha / "3", 2, 9)
    output = tmp_path / "o"
    if command == "fit":
        args = fit_args(tiny_setup, output, "--eval", str(tiny_setup.eval))
    else:
        args = merge_args(tiny_setup, output, "--eval", str(tiny_setup.eval), "--calib", str(tiny_setup.calib))
    message = run_fails(args, caplog)
    count = 2 if change == "missing" else 4
    assert f"{count} class folder(s)" in message and "predicts 3 classes" in message, message
    assert not output.exists()


# -- merge without --calib ----------------------------------------------------------------------
@pytest.mark.parametrize("with_eval", [False, True])
def test_merge_without_calib_on_a_batchnorm_model_says_what_to_do(tiny_setup, tmp_path, caplog, with_eval):
    args = merge_args(tiny_setup, tmp_path / "o", *(["--eval", str(tiny_setup.eval)] if with_eval else []))
    args[args.index("--batchnorm") + 1] = "reestimate"
    message = run_fails(args, caplog)
    assert "--batchnorm reestimate re-estimates BatchNorm statistics on --calib data" in message
    assert "--batchnorm base" in message


# -- trust-pickles on plain files -------------------------------------------------------------
def test_trust_pickles_flag_reaches_plain_file_experts(tiny_setup, tmp_path, caplog):
    from tests.tiny import tiny_convnet

    module = tiny_convnet(num_classes=4)
    module.load_state_dict(torch.load(tiny_setup.experts["beta"], weights_only=True))
    pickled = tmp_path / "beta-module.pt"
    torch.save(module, pickled)
    experts = [f"alpha={tiny_setup.experts['alpha']}", f"beta={pickled}"]
    message = run_fails(merge_args(tiny_setup, tmp_path / "o", experts=experts), caplog)
    assert "--trust-pickles true" in message and "weights_only=False" not in message
    assert main(merge_args(tiny_setup, tmp_path / "o", "--trust-pickles", experts=experts)) == 0
    plain = tmp_path / "plain"
    assert main(merge_args(tiny_setup, plain)) == 0
    ours, reference = (torch.load(p / "merged.pt", weights_only=True) for p in (tmp_path / "o", plain))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


# -- the command line itself ------------------------------------------------------------------
@pytest.mark.parametrize("command", ["fit", "merge"])
def test_help_is_fast_and_readable(command):
    started = time.perf_counter()
    result = subprocess.run(_cli(command, "--help"), capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    assert "<function" not in result.stdout and "lambda" not in result.stdout
    assert "--no-overwrite" in result.stdout and "{auto,reestimate,per-task,base,merge}" in result.stdout
    if command == "fit":
        assert "chunk:N" in result.stdout and "partition:N" in result.stdout and "tensor" in result.stdout
        assert "{float32,bfloat16,float16}" in result.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.1f} s"


def test_help_does_not_import_torch():
    code = "import sys; from adamerge.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("flags,expected", [([], False), (["--overwrite"], True), (["--no-overwrite"], False),
                                            (["--overwrite", "true"], True), (["--overwrite=false"], False)])
def test_boolean_options_take_bare_flags(flags, expected, tmp_path):
    from adamerge.cli import build_parser

    args = build_parser().parse_args(["merge", "--base", "a@b", "--experts", "x=y", "--method", "average",
                                      "--output", str(tmp_path), *flags])
    assert args.merge.overwrite is expected


def test_bare_overwrite_flag_replaces_an_existing_output(tiny_setup, tmp_path):
    output = tmp_path / "o"
    assert main(fit_args(tiny_setup, output)) == 0
    assert main(fit_args(tiny_setup, output, "--overwrite")) == 0
    assert leftovers(tmp_path) == []

