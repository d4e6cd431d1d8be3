"""The ``adamerge`` command line (jsonargparse: typed options, ``--config FILE.yaml``,
``--print_config``). Nothing imports this module; the work is done by importable functions.

The parser is derived from the settings dataclasses (:mod:`adamerge.run.settings`: one option per
field, its help the field's docstring entry) and built from torch-free modules only (the method
registry's names), so ``adamerge fit --help`` answers at once. Boolean options take the bare
flag (``--overwrite``), its negation (``--no-overwrite``) or a value (``--overwrite true``, as YAML
writes it). SIGTERM, SIGHUP and SIGINT (Ctrl-C) stop a run alike: the temporary output is removed,
the error line says what was kept, and the exit code is 128 + the signal number.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from adamerge.errors import AdamergeError, Terminated
from adamerge.run.settings import FitSettings, MergeSettings, ParetoSettings, field_help

logger = logging.getLogger("adamerge")


def _flag(parser: ArgumentParser, name: str, default: bool, help: str) -> None:
    """``--name`` / ``--no-name`` / ``--name true|false``."""
    parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, default=default, help=help)
    parser.add_argument(
        f"--no-{name}",
        dest=name.replace("-", "_"),
        action="store_const",
        const=False,
        default=argparse.SUPPRESS,
        help=f"the same as --{name} false",
    )


def _choices(names: Sequence[str]) -> Any:
    return Literal[tuple(names)]  # help shows {a,b,c}


def _method_help(help: str, learned: bool) -> str:
    from adamerge.methods import method_names

    return f"{help} {{{','.join(method_names(learned))}}}"


def add_settings_arguments(parser: ArgumentParser, settings: type, learned: bool) -> None:
    """One option per field of the settings dataclass ``settings``, in declaration order.

    The help is the field's docstring entry, the type and default the field's, the choices and
    the command-line shape (``nargs``, ``metavar``) its :func:`adamerge.run.settings.option` metadata;
    booleans take ``--name``, ``--no-name`` or ``--name true|false``.
    """
    hints = typing.get_type_hints(settings)
    helps = field_help(settings)
    for spec in dataclasses.fields(settings):
        name, hint, meta = spec.name, hints[spec.name], spec.metadata
        flag = name.replace("_", "-")
        text = helps[name].replace("``", "")  # the docstring's RST literals, plain on a terminal
        help = text if name != "method" else _method_help(text, learned)
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        required = default is dataclasses.MISSING
        if hint is bool:
            _flag(parser, flag, bool(default), help)
            continue
        optional = type(None) in typing.get_args(hint)
        if meta.get("choices"):
            kind: Any = _choices(meta["choices"]) | None if optional else _choices(meta["choices"])
        elif meta.get("nargs") is not None:
            element = typing.get_args(hint)[0] if typing.get_origin(hint) in (tuple, typing.Union, types.UnionType) else str
            kind = typing.get_args(element)[0] if typing.get_origin(element) is tuple else element
            kind = str if kind is str or typing.get_origin(hint) is dict else kind
        else:
            kind = hint
        extra = {k: meta[k] for k in ("nargs", "metavar") if meta.get(k) is not None}
        if required:
            parser.add_argument(f"--{flag}", type=kind, required=True, help=help, **extra)
        else:
            parser.add_argument(
                f"--{flag}", type=kind, default=list(default) if isinstance(default, tuple) else default, help=help, **extra
            )


def _parser(settings: type, description: str, learned: bool) -> ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    add_settings_arguments(parser, settings, learned)
    return parser


def as_settings(settings: type, values: dict[str, Any]) -> Any:
    """The settings object of parsed option ``values`` (lists back to tuples, experts to a mapping)."""
    hints = typing.get_type_hints(settings)
    converted = dict(values)
    for name, value in values.items():
        if isinstance(value, list) and tuple in (typing.get_origin(hints[name]), *map(typing.get_origin, typing.get_args(hints[name]))):
            converted[name] = tuple(value)
    converted["experts"] = parse_experts(values["experts"])
    return settings(**converted)


def build_parser() -> ArgumentParser:
    """The top-level parser with its subcommands, derived from :mod:`adamerge.run.settings`."""
    parser = ArgumentParser(prog="adamerge", description="Test-time adaptive model merging.")
    parser.add_argument("--log-level", type=str, default="INFO", help="DEBUG | INFO | WARNING")
    subcommands = parser.add_subcommands(dest="command")
    fit = _parser(FitSettings, "Learn merging coefficients of fine-tuned experts on unlabeled data.", learned=True)
    merge = _parser(MergeSettings, "Merge experts with a static method (no training).", learned=False)
    subcommands.add_subcommand("fit", fit, help="learn merging coefficients and export the merged model")
    subcommands.add_subcommand("merge", merge, help="static merge (average, task arithmetic, TIES, ...)")
    pareto = _parser(ParetoSettings, "Amortized Pareto front of task-wise λ by quadratic surrogates (MAP).", learned=False)
    subcommands.add_subcommand("pareto", pareto, help="Pareto front of task arithmetic λ per task (MAP); export a picked point")
    return parser


def parse_experts(items: Sequence[str]) -> dict[str, str]:
    """``["mnist=a.pth", ...]`` -> ``{"mnist": "a.pth"}``, refusing malformed or repeated names (the
    names' characters are checked by ``run_fit`` / ``run_merge``, :mod:`adamerge.run.task_names`)."""
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
    from adamerge.run.resume import last_checkpoint_step

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
            if args.command == "fit":
                from adamerge.run.fit import run_fit

                run_fit(as_settings(FitSettings, options))
            elif args.command == "merge":
                from adamerge.run.merge import run_merge

                run_merge(as_settings(MergeSettings, options))
            else:
                from adamerge.run.pareto import run_pareto

                run_pareto(as_settings(ParetoSettings, options))
    except AdamergeError as error:
        logger.error("%s", error)
        return 2
    except ValueError as error:  # the torch-only routing runtime's errors: a model the routed methods cannot route
        routing = sys.modules.get("adamerge.core.routed_weights")  # (not imported: not a routing error; --help stays fast)
        if routing is None or not isinstance(error, routing.RoutingError):
            raise
        logger.error("%s", error)
        return 2
    except Terminated as stop:
        logger.error("%s", _stopped(output, f"stopped by {stop.signal_name}"))
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
