"""The command line is derived from the settings dataclasses: one option per field, nothing else."""

from __future__ import annotations

import dataclasses
import re

import pytest

from adamerge.cli import _parser, as_settings
from adamerge.run.settings import FitSettings, MergeSettings, field_help

CASES = [(FitSettings, True), (MergeSettings, False)]
NOT_SETTINGS = {"help", "config", "print_config"}


@pytest.mark.parametrize(("settings", "learned"), CASES, ids=["fit", "merge"])
def test_every_settings_field_has_exactly_one_option(settings, learned):
    parser = _parser(settings, "", learned)
    actions = [a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS]
    primary = [a for a in actions if not a.option_strings[0].startswith("--no-")]
    names = [f.name for f in dataclasses.fields(settings)]
    assert [a.dest for a in primary] == names  # each field once, in declaration order, nothing else
    assert [a.option_strings for a in primary] == [["--" + n.replace("_", "-")] for n in names]
    booleans = [f.name for f in dataclasses.fields(settings) if f.type == "bool"]
    assert [a.dest for a in actions if a not in primary] == booleans  # --no-NAME: the same option negated
    helps = field_help(settings)
    assert set(helps) == set(names) and all(helps.values())  # every field documented once


@pytest.mark.parametrize(("settings", "learned"), CASES, ids=["fit", "merge"])
def test_help_lists_each_option_once_with_its_choices(settings, learned):
    text = _parser(settings, "", learned).format_help()
    options_part = text.split("options:", 1)[1]
    for spec in dataclasses.fields(settings):
        flag = "--" + spec.name.replace("_", "-")
        assert len(re.findall(rf"^  {re.escape(flag)}[ \n]", options_part, flags=re.M)) == 1, flag
    text = "".join(text.split())  # argparse wraps lines anywhere in a long word
    assert "{auto,reestimate,per-task,base,merge}" in text
    assert ("{adamerging,adamerging++,atlas" if learned else "{average,task-arithmetic,ties") in text


def test_parsed_values_become_the_settings_object(tmp_path):
    parser = _parser(FitSettings, "", True)
    args = parser.parse_args(["--base", "a@b", "--experts", "x=y.pt", "z=w.pt", "--calib", str(tmp_path),
                              "--output", str(tmp_path / "o"), "--image-mean", "0.5", "0.5", "0.5",
                              "--align-modules", "features", "--no-eval-init", "--options", "{trim_density: 0.3}"])  # fmt: skip
    values = {k: v for k, v in args.as_dict().items() if k != "config"}
    settings = as_settings(FitSettings, values)
    assert settings.experts == {"x": "y.pt", "z": "w.pt"} and settings.image_mean == (0.5, 0.5, 0.5)
    assert settings.align_modules == ("features",) and settings.eval_init is False
    assert settings.options == {"trim_density": 0.3} and settings.steps == 500
    assert dataclasses.asdict(settings).keys() == {f.name for f in dataclasses.fields(FitSettings)}
