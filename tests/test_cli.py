import subprocess
import sys

import pytest

from mveb.cli import main

SUBCOMMANDS = ["validate", "shards", "pretrain", "knn", "lineval", "bench", "demo", "report"]


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "mveb", "--help"], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert f"    {name}" in out, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: mveb " + name in capsys.readouterr().out


def test_wrong_option_is_one_line_exit_2() -> None:
    r = subprocess.run([sys.executable, "-m", "mveb", "validate", "--no-such-option"], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_slurm_launch_help() -> None:
    r = subprocess.run([sys.executable, "slurm/launch.py", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--nodes" in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["bench", "step", "--batch-size", "0"], "--batch-size must be at least 2"),
    (["bench", "step", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["bench", "step", "--steps", "0"], "--steps must be at least 1"),
])
def test_bench_step_refuses_a_batch_or_step_count_it_would_not_run(argv: list[str], message: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # 0 once meant "the default": a benchmark of batch 8 reported for --batch-size 0.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
