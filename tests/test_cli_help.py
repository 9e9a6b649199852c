"""README "The contract, in our words": every subcommand answers --help with exit 0; `python -m vgw` is the same CLI."""

from __future__ import annotations

import re

import pytest
from vgw.cli import main

COMMANDS = [
    [], ["run"], ["consent"], ["consent", "apply"], ["consent", "show"], ["status"], ["demo"], ["bench"],
    ["sim"], ["sim", "can"], ["sim", "elm327"], ["sim", "fleet"], ["cloud"], ["cloud", "keygen"],
    ["cloud", "sign"], ["cloud", "push"], ["cloud", "revoke"], ["cloud", "listen"], ["cloud", "verify-receipt"],
    ["audit"], ["audit", "verify"], ["audit", "show"], ["report"], ["provision"], ["doctor"], ["install"],
    ["uninstall"], ["dev"], ["dev", "init"], ["dev", "up"], ["dev", "status"], ["dev", "down"], ["monitor"],
]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "vgw")
def test_help_exits_0(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    assert "usage: vgw" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["frobnicate"])
    assert done.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# reStructuredText inline markup, which argparse prints as it is: ``literal``, :role:`target`.
RST = re.compile(r"``|:(?:data|class|func|meth|mod|attr|exc|obj|ref):`")


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "vgw")
def test_help_shows_no_restructuredtext_markup(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A help text is read in a terminal: a module docstring used as a description must not show its markup."""
    with pytest.raises(SystemExit):
        main([*words, "--help"])
    out = capsys.readouterr().out
    assert not RST.search(out), out
