"""The ``adamerge`` command line (jsonargparse: typed options, ``--config FILE.yaml``,
``--print_config``). Nothing imports this module; the work is done by importable functions.

The parser is built from torch-free modules only (:mod:`adamerge.choices`, the method
registries' names), so ``adamerge fit --help`` answers at once. Boolean options take the bare
flag (``--overwrite``), its negation (``--no-overwrite``) or a value (``--overwrite true``, as YAML
writes it). SIGTERM, SIGHUP and SIGINT (Ctrl-C) stop a run alike: the temporary output is removed,
the error line says what was kept, and the exit code is 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from adamerge.choices import BATCHNORM_POLICIES, CONSTRAINTS, GRANULARITY_FORMS, TASK_VECTOR_DTYPES
from adamerge.errors import AdamergeError, Terminated

logger = logging.getLogger("adamerge")


def _flag(parser: ArgumentParser, name: str, default: bool, help: str) -> None:
    """``--name`` / ``--no-name`` / ``--name true|false``."""
    parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, default=default, help=help)
    parser.add_argument(
        f"--no-{name}", dest=name.replace("-", "_"), action="store_const", const=False, default=argparse.SUPPRESS,
        help=f"the same as --{name} false",
    )


def _choices(names: Sequence[str]) -> Any:
    return Literal[tuple(names)]  # help shows {a,b,c}


def _common_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument(
        "--base", type=str, required=True, help="ARCH@WEIGHTS (torchvision:mobilenet_v2@base.pth), open_clip:ARCH@FILE or hf:DIR"
    )
    parser.add_argument("--base-kwargs", type=dict, default={}, help="constructor keyword arguments of ARCH")
    parser.add_argument(
        "--experts", type=str, nargs="+", required=True,
        help="NAME=PATH (or NAME=hf:DIR, NAME=peft:ADAPTER_DIR) per expert; NAME: letters, digits, _ . + - (1-64)",
    )
    _flag(parser, "trust-pickles", False, "accept checkpoint files holding pickled Python objects (whole modules): "
          "loading them runs code from the file, so only for files you trust")
    parser.add_argument("--eval", type=Path | None, default=None, help="folder <task>/<class>/<file> of labelled data")
    parser.add_argument("--head-pattern", type=str | None, default=None, help="regex of task-specific tensors")
    parser.add_argument(
        "--task-specific", type=str | None, default=None,
        help="merged tensors each task keeps from its own expert: batchnorm (every BatchNorm layer's weight and bias), norm, or a regex",
    )
    parser.add_argument(
        "--batchnorm", type=_choices(BATCHNORM_POLICIES), default="auto",
        help="BatchNorm statistics policy (auto: per-task when every task has its own head, else reestimate)",
    )
    parser.add_argument(
        "--image-size", type=int | None, default=None,
        help="square input side of image experts (default: the model's metadata, else the calibration images' common size, else 224)",
    )
    parser.add_argument("--image-mean", type=float, default=None, nargs=3, help="normalisation mean per RGB channel (default: the model's, else ImageNet's)")
    parser.add_argument("--image-std", type=float, default=None, nargs=3, help="normalisation std per RGB channel (default: the model's, else ImageNet's)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (text experts)")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="inputs per evaluation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="output folder (refused if it exists)")
    _flag(parser, "overwrite", False, "replace an existing output folder")


def _merge_parser() -> ArgumentParser:
    from adamerge.static_presets import STATIC_PRESETS

    parser = ArgumentParser(description="Merge experts with a static method (no training).")
    _common_arguments(parser)
    parser.add_argument("--method", type=_choices(sorted(STATIC_PRESETS)), required=True, help="static merge")
    parser.add_argument("--options", type=dict, default={}, help="method options, e.g. {scale: 0.4, density: 0.2}")
    parser.add_argument(
        "--calib", type=Path | None, default=None,
        help="unlabeled data per task, for BatchNorm statistics (needed by models with BatchNorm under "
        "--batchnorm reestimate / per-task)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per batch of BatchNorm re-estimation")
    return parser


def _fit_parser() -> ArgumentParser:
    from adamerge.methods import METHODS

    parser = ArgumentParser(description="Learn merging coefficients of fine-tuned experts on unlabeled data.")
    _common_arguments(parser)
    parser.add_argument("--calib", type=Path, required=True, help="folder with one sub-folder of unlabeled data per expert")
    parser.add_argument("--method", type=_choices(sorted(METHODS)), default="adamerging", help="learned-coefficient method")
    parser.add_argument("--granularity", type=str, default="layer", help=" | ".join(GRANULARITY_FORMS) + " (layer = one λ per tensor)")
    parser.add_argument("--init", type=float | None, default=None, help="initial λ (method default)")
    parser.add_argument("--constraint", type=_choices(CONSTRAINTS) | None, default=None, help="constraint g of λ (method default)")
    parser.add_argument("--task-vector-dtype", type=_choices(TASK_VECTOR_DTYPES), default="float32", help="storage of the task vectors")
    parser.add_argument("--steps", type=int, default=500, help="optimisation steps")
    parser.add_argument("--lr", type=float | None, default=None, help="learning rate (method default)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration inputs per task per step")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--accelerator", type=str, default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--devices", type=int | str, default="auto", help="Lightning devices")
    parser.add_argument("--strategy", type=str, default="auto", help="Lightning strategy: auto, ddp, ...")
    parser.add_argument("--shots", type=int | None, default=None, help="atlas few-shot: labelled images per class")
    parser.add_argument("--calib-limit", type=int | None, default=None, help="calibration inputs per task the objective trains on (seeded subset; BatchNorm statistics use them all)")
    parser.add_argument("--pseudo-label-threshold", type=float, default=0.99, help="atlas test-time adaptation")
    parser.add_argument(
        "--align-modules", type=list[str], default=["<head input>"], help="expert-merging: hidden states aligned"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="expert-merging: distillation T")
    parser.add_argument("--gamma", type=float, default=5.0, help="expert-merging: coefficient regulariser weight")
    parser.add_argument("--task-weights", type=dict[str, float], default={}, help="weight of each task's loss, e.g. {mnist: 2} (every method; expert-merging's β; default 1)")
    parser.add_argument("--chunk-budget", type=int | None, default=None, help="expert-merging++: chunk budget B")
    parser.add_argument("--chunk-kappa", type=float, default=1.0, help="expert-merging++: importance sharpness κ")
    _flag(parser, "eval-experts", True, "also evaluate each expert alone")
    _flag(parser, "eval-init", True, "also evaluate the initial merge (λ = init)")
    _flag(parser, "group-by-length", False, "text: training batches of texts of similar length")
    _flag(parser, "progress-bar", True, "a live bar of the training steps (interactive terminals)")
    parser.add_argument(
        "--holdout", type=float, default=0.1,
        help="share of each task's calibration inputs held out to keep the λ that agrees best with the experts (start included; 0: off)",
    )
    _flag(parser, "resume", False, "continue an interrupted fit of the same settings and --output from its last checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between the λ-only resume checkpoints (0: only at the end)")
    return parser


def build_parser() -> ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = ArgumentParser(prog="adamerge", description="Test-time adaptive model merging.")
    parser.add_argument("--log-level", type=str, default="INFO", help="DEBUG | INFO | WARNING")
    subcommands = parser.add_subcommands(dest="command")
    subcommands.add_subcommand("fit", _fit_parser(), help="learn merging coefficients and export the merged model")
    subcommands.add_subcommand("merge", _merge_parser(), help="static merge (average, task arithmetic, TIES, ...)")
    return parser


def parse_experts(items: Sequence[str]) -> dict[str, str]:
    """``["mnist=a.pth", ...]`` -> ``{"mnist": "a.pth"}``, refusing malformed or repeated names (the
    names' characters are checked by ``run_fit`` / ``run_merge``, :mod:`adamerge.task_names`)."""
    experts: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise AdamergeError(f"--experts {item!r}: expected NAME=PATH")
        if name in experts:
            raise AdamergeError(f"--experts: expert name {name!r} is given twice")
        experts[name] = path
    return experts


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGTERM / SIGHUP / SIGINT raise :class:`Terminated` while the block runs. The default
    handlers would end the process without cleaning up (SIGTERM) or raise ``KeyboardInterrupt``,
    which Lightning turns into ``sys.exit(1)`` without saying what was kept."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stopped(output: Path, reason: str) -> str:
    from adamerge.resume import last_checkpoint_step

    line = f"{reason}: nothing was written to {output}"
    found = last_checkpoint_step(output)
    if found is not None:
        path, step = found
        line += f"; the same command with --resume continues from step {step} ({path})"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adamerge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    options = {k: v for k, v in args[args.command].as_dict().items() if k != "config"}
    output = Path(options["output"])
    try:
        with _signals_as_exceptions():
            options["experts"] = parse_experts(options["experts"])
            if args.command == "fit":
                from adamerge.fit import FitSettings, run_fit

                options["align_modules"] = tuple(options["align_modules"])
                run_fit(FitSettings(**options))
            else:
                from adamerge.static_run import MergeSettings, run_merge

                run_merge(MergeSettings(**options))
    except AdamergeError as error:
        logger.error("%s", error)
        return 2
    except Terminated as stop:
        logger.error("%s", _stopped(output, f"stopped by {stop.signal_name}"))
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
