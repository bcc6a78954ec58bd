"""The console command: fast top-level help, every subcommand listed, unknown commands refused."""

import subprocess
import sys
import time

from minimind.cli import SUBCOMMANDS, main


def test_top_level_help_is_fast_and_lists_subcommands():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "minimind", "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    for name in SUBCOMMANDS:
        assert f"  {name}" in out.stdout
    assert "torch" not in sys.modules or elapsed < 5  # help never imports torch; see next assertion
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from minimind.cli import main; main(['--help']); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().endswith("False")


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_version_flag_prints_the_package_version():
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        out = subprocess.run([sys.executable, "-m", "minimind", flag], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"minimind {version('my-minimind')}"
