"""Every option of `rlops bench` and `rlops profile` says what it takes: a one-line help, with the
choices of the options that take a fixed set of values (and argparse enforces those)."""

from __future__ import annotations

import argparse

import pytest

from rlops import profile_cli
from rlops.bench import run

PARSERS = {
    "bench": (run.build_parser, {"--ops", "--providers", "--dtype", "--arch"}),
    "profile": (profile_cli.build_parser, {"--algo", "--loss", "--dtype"}),
}


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_option_has_a_one_line_help_listing_its_choices(command: str) -> None:
    build, fixed = PARSERS[command]
    actions = [a for a in build()._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.option_strings[0] for a in actions if a.choices} == fixed
    for action in actions:
        name = action.option_strings[0]
        assert action.help and action.help.strip() and "\n" not in action.help, name
        for choice in action.choices or ():
            assert str(choice) in action.help, (name, choice)
