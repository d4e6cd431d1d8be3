"""The ``adamerge`` command line (jsonargparse: typed options, ``--config FILE.yaml``,
``--print_config``). Nothing imports this module; the work is done by importable functions."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from adamerge.errors import AdamergeError


def _common_arguments(parser: ArgumentParser) -> None:
    from adamerge.batchnorm import BATCHNORM_POLICIES

    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument(
        "--base", type=str, required=True, help="ARCH@WEIGHTS (torchvision:mobilenet_v2@base.pth), open_clip:ARCH@FILE or hf:DIR"
    )
    parser.add_argument("--base-kwargs", type=dict, default={}, help="constructor keyword arguments of ARCH")
    parser.add_argument(
        "--experts", type=str, nargs="+", required=True, help="NAME=PATH (or NAME=hf:DIR, NAME=peft:ADAPTER_DIR) per expert"
    )
    parser.add_argument("--trust-pickles", type=bool, default=False, help="accept expert files that are pickled modules")
    parser.add_argument("--eval", type=Path | None, default=None, help="folder <task>/<class>/<file> of labelled data")
    parser.add_argument("--head-pattern", type=str | None, default=None, help="regex of task-specific tensors")
    parser.add_argument(
        "--task-specific", type=str | None, default=None,
        help="merged tensors each task keeps from its own expert: batchnorm (every BatchNorm layer's weight and bias), norm, or a regex",
    )
    parser.add_argument("--batchnorm", type=str, default="reestimate", choices=list(BATCHNORM_POLICIES))
    parser.add_argument("--image-size", type=int, default=224, help="square input side (image experts)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (text experts)")
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="output folder (refused if it exists)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing output folder")


def _merge_parser() -> ArgumentParser:
    from adamerge.static import STATIC_METHODS

    parser = ArgumentParser(description="Merge experts with a static method (no training).")
    _common_arguments(parser)
    parser.add_argument("--method", type=str, required=True, choices=sorted(STATIC_METHODS))
    parser.add_argument("--options", type=dict, default={}, help="method options, e.g. {scale: 0.4, density: 0.2}")
    parser.add_argument("--calib", type=Path | None, default=None, help="unlabeled data per task (BatchNorm statistics)")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def _fit_parser() -> ArgumentParser:
    from adamerge.fit import DTYPES
    from adamerge.methods import METHODS

    parser = ArgumentParser(description="Learn merging coefficients of fine-tuned experts on unlabeled data.")
    _common_arguments(parser)
    parser.add_argument("--calib", type=Path, required=True, help="folder with one sub-folder of unlabeled data per expert")
    parser.add_argument("--method", type=str, default="adamerging", choices=sorted(METHODS))
    parser.add_argument("--granularity", type=str, default="layer", help="task | layer | group:REGEX[;REGEX]")
    parser.add_argument("--init", type=float | None, default=None, help="initial λ (method default)")
    parser.add_argument("--constraint", type=str | None, default=None, help="clamp | sigmoid | none (method default)")
    parser.add_argument("--task-vector-dtype", type=str, default="float32", choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=500, help="optimisation steps")
    parser.add_argument("--lr", type=float | None, default=None, help="learning rate (method default)")
    parser.add_argument("--batch-size", type=int, default=16, help="calibration inputs per task per step")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=int | str, default="auto")
    parser.add_argument("--strategy", type=str, default="auto")
    parser.add_argument("--shots", type=int | None, default=None, help="atlas few-shot: labelled images per class")
    parser.add_argument("--calib-limit", type=int | None, default=None, help="calibration inputs per task the objective trains on (seeded subset; BatchNorm statistics use them all)")
    parser.add_argument("--pseudo-label-threshold", type=float, default=0.99, help="atlas test-time adaptation")
    parser.add_argument(
        "--align-modules", type=list[str], default=["<head input>"], help="expert-merging: hidden states aligned"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="expert-merging: distillation T")
    parser.add_argument("--gamma", type=float, default=5.0, help="expert-merging: coefficient regulariser weight")
    parser.add_argument("--task-weights", type=dict[str, float], default={}, help="expert-merging: β per task")
    parser.add_argument("--chunk-budget", type=int | None, default=None, help="expert-merging++: chunk budget B")
    parser.add_argument("--chunk-kappa", type=float, default=1.0, help="expert-merging++: importance sharpness κ")
    parser.add_argument("--eval-experts", type=bool, default=True, help="also evaluate each expert alone")
    parser.add_argument("--eval-init", type=bool, default=True, help="also evaluate the initial merge (λ = init)")
    parser.add_argument(
        "--group-by-length", type=bool, default=False, help="text: training batches of texts of similar length"
    )
    parser.add_argument("--progress-bar", type=bool, default=True)
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
    """``["mnist=a.pth", ...]`` -> ``{"mnist": "a.pth"}``, refusing malformed or repeated names."""
    experts: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AdamergeError(f"--experts {item!r}: expected NAME=PATH")
        if name in experts:
            raise AdamergeError(f"--experts: expert name {name!r} is given twice")
        experts[name] = path
    return experts


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adamerge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "fit":
            from adamerge.fit import FitSettings, run_fit

            options = {k: v for k, v in args.fit.as_dict().items() if k != "config"}
            options["experts"] = parse_experts(options["experts"])
            options["align_modules"] = tuple(options["align_modules"])
            run_fit(FitSettings(**options))
        elif args.command == "merge":
            from adamerge.static_run import MergeSettings, run_merge

            options = {k: v for k, v in args.merge.as_dict().items() if k != "config"}
            options["experts"] = parse_experts(options["experts"])
            run_merge(MergeSettings(**options))
    except AdamergeError as error:
        logging.getLogger("adamerge").error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
