"""The CLI explains itself (issue 31 item 4): every option of every command has help, metavars
are words rather than internal names, `admmq quantize --help` groups flags by what a user
decides and states each recipe flag's default, and `admmq doctor` reports what the machine has."""

from __future__ import annotations

import argparse
import json

import pytest

from admmq_dist.cli import build_parser, main
from admmq_dist.cli_flags import HELP_GROUPS, RECIPE_FLAGS


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_has_help_and_a_word_for_a_metavar(command):
    for action in commands()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (command, action.option_strings or action.dest)
        takes_value = action.nargs != 0 and action.option_strings
        if takes_value and action.choices is None:
            # argparse would print the destination, e.g. SOLVER__ADMM__ITERATIONS.
            assert action.metavar and "__" not in action.metavar, (command, action.dest)


def test_quantize_help_groups_flags_by_decision_and_states_defaults():
    parser = commands()["quantize"]
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert titles == ["options", *HELP_GROUPS]
    flags = {flag for flag, _, _ in RECIPE_FLAGS}
    for action in parser._actions:
        if set(action.option_strings) & flags:
            assert "default" in action.help, action.option_strings
    group_of = {a.option_strings[0]: g.title for g in parser._action_groups
                for a in g._group_actions if a.option_strings}
    assert group_of["--bits"] == group_of["--grid"] == "grid and format"
    assert group_of["--schedule"] == group_of["--workers"] == "schedule and cluster"
    assert group_of["--resume"] == "resume" and group_of["--num-samples"] == "calibration"
    text = parser.format_help()
    assert "--iterations N" in text and "SOLVER__" not in text
    assert "--keep-best" in text and "(default: off)" in text


def test_doctor_reports_versions_devices_and_who_serves_what(capsys):
    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["packages"]["torch"] and "transformers" in found["packages"]
    assert isinstance(found["cuda_devices"], list)
    verdicts = found["serving"]["3-bit symmetric group 128 gptq"]
    assert verdicts["vLLM 0.33.0"].startswith("no")
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "Who serves what" in text and "compressed-tensors" in text
