"""The CLI frame: help, version, and bad input as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pathvlm import __version__
from pathvlm.cli import EXIT_BAD_INPUT, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: pathvlm" in capsys.readouterr().out


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no sub-commands registered"
    for name, p in sub.choices.items():
        assert p.format_help().startswith("usage: pathvlm " + name)


def test_import_is_cheap_and_side_effect_free():
    # importing the package must not pull torch or probe devices
    code = "import sys, pathvlm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_console_script_bad_input_exit_code(tmp_path):
    missing = tmp_path / "nope.svs"
    code = "import sys; from pathvlm.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "info", str(missing)], capture_output=True, text=True, check=False
    )
    assert out.returncode == EXIT_BAD_INPUT
    assert str(missing) in out.stderr
    assert "Traceback" not in out.stderr
