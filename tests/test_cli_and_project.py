"""The console script, and project files that must stay valid (cluster.yaml for `ray up`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from trainables import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mode-cl {__version__}"
    assert main([]) == 2
    assert "pretrain-base" in capsys.readouterr().out


def test_methods_lists_every_registered_method_with_a_description(capsys):
    from trainables.methods import METHODS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in METHODS:
        [row] = [line for line in lines if f" {name} " in line]
        assert len(row.split("│")[2].strip()) > 10, row


def test_console_script_is_installed():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("mode-cl")), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "usage: mode-cl" in result.stdout
