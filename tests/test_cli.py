"""The console scripts as a user runs them: a mistake on the command line is one readable line.

A value of the wrong type, a missing required option or an unknown flag gives `error: ...` on stderr, one
line naming what is wrong and where the help is, exit status 2 (click's usage box is several lines of box
drawing that a log or a terminal in a lab mangles); help and a good command are unchanged.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import cli


def run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli(name), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, args, says", [
    ("tsotsa-peer", ["join", "--coordinator", "127.0.0.1:1", "--port", "abc"], "'--port'"),
    ("tsotsa-peer", ["join"], "'--coordinator'"),
    ("tsotsa-peer", ["join", "--coordinator", "127.0.0.1:1", "--blcoks", "0:2"], "--blcoks"),
    ("tsotsa-coordinator", ["up", "--model", "m", "--port", "seventy"], "'--port'"),
    ("tsotsa", ["generate", "--coordinator", "127.0.0.1:1", "hi", "--max-new-tokens", "many"], "'--max-new-tokens'"),
    ("tsotsa", ["plan", "--model", "llama-2-7b"], "'--machines'"),
    ("tsotsa", ["no-such-command"], "no-such-command"),
])
def test_a_usage_error_is_one_line(name, args, says) -> None:
    result = run(name, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "--help'" in lines[0] and "╭" not in result.stderr and result.stdout == ""


def test_help_and_a_good_command_are_unchanged() -> None:
    helped = run("tsotsa-peer", "join", "--help")
    assert helped.returncode == 0 and "--rebalance" in helped.stdout and helped.stderr == ""
    planned = run("tsotsa", "plan", "--model", "llama-2-7b", "--quant", "nf4", "--machines", "1x16GiB")
    assert planned.returncode == 0 and "llama-2-7b: 32 blocks" in planned.stdout, planned.stderr
    failed = run("tsotsa", "plan", "--model", "llama-2-70b", "--machines", "1x16GiB")
    assert failed.returncode == 1 and failed.stderr.startswith("error: the machines hold"), failed.stderr
