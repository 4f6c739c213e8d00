"""`multitune --help` and every subcommand's --help: each positional argument is described and each option's
default is shown (in argparse's words, or the help's own)."""

from __future__ import annotations

import argparse
import re

import pytest

from multitune.cli import _parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_is_described_and_every_default_shown(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    shown = flat(capsys.readouterr().out)
    for action in subcommands()[name]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.dest} has no help"
        assert flat(action.help) in shown
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS):
            continue
        assert f"(default: {default})" in shown or "default" in action.help, f"{name} {action.dest}: no default"


def test_top_level_help_describes_each_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = flat(capsys.readouterr().out)
    assert "COMMAND what to do (COMMAND --help: its arguments)" in shown
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    described = {choice.dest: choice.help for choice in action._choices_actions}
    assert set(described) == set(subcommands())
    for name, words in described.items():
        assert words and f"{name} {flat(words)}" in shown, name


def test_known_defaults_are_printed(capsys):
    """Values read off the argument definitions by hand: serve's port and batching, evaluate's split."""
    for command, expected in (
        (["serve", "--help"], ["port to listen on (default: 8000)", "records per request (default: 64)"]),
        (["evaluate", "--help"], ["the split to score (default: test)"]),
        (["report", "--help"], ["run_dir a run directory: the folder `multitune train` printed after 'saved to'"]),
    ):
        with pytest.raises(SystemExit):
            main(command)
        shown = flat(capsys.readouterr().out)
        for words in expected:
            assert words in shown, (command, words)


def test_predictions_are_one_record_a_line_whatever_their_text():
    """JSON keeps U+2028, U+2029 and NEL raw inside strings, yet str.splitlines and many JSONL readers break
    lines there: `multitune predict` escapes them, so a record never spans two lines."""
    import json

    from multitune.cli import jsonl_line

    value = {"prediction": "a\u2028b\u2029c\x85d", "raw": "é"}
    line = jsonl_line(value)
    assert line.endswith("\n") and len(line.splitlines()) == 1
    assert json.loads(line) == value
    assert "é" in line  # text stays readable: no ASCII escapes beyond the line breaks
