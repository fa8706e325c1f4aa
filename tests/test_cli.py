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


def test_overrides_may_come_between_flags_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse once took only the first run of key=value words and called the rest
    unrecognized arguments; what is not an override is still one."""
    from mveb.cli import build_parser
    from slurm.launch import train_parser

    args = build_parser().parse_args(["pretrain", "a=1", "--data", "d", "b=2", "--out", "o", "a=3"])
    assert (args.overrides, args.data, args.out) == (["a=1", "b=2", "a=3"], "d", "o")
    args = train_parser().parse_args(["--nodes", "2", "a=1", "--data", "d", "b=2"])
    assert (args.overrides, args.nodes) == (["a=1", "b=2"], 2)
    for argv, bad in ((["pretrain", "a=1", "--data", "d", "oops", "--out", "o"], "oops"),
                      (["pretrain", "--data", "d", "--out", "o", "a=1", "--bogus=1"], "--bogus=1"),
                      (["knn", "--train", "t", "--val", "v", "a=1"], "a=1")):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"mveb: error: unrecognized arguments: {bad} (see mveb --help)\n"


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


@pytest.mark.parametrize("argv,message", [
    (["validate", "--src", "DATA", "--workers", "0"], "--workers must be at least 1"),
    (["shards", "--src", "DATA", "--out", "OUT/x.beton", "--workers", "-3"], "--workers must be at least 1"),
    (["shards", "--src", "DATA", "--out", "OUT/x.beton", "--timeout", "0"], "--timeout must be a positive number"),
    (["knn", "--train", "DATA", "--val", "DATA", "--temperature", "nan"], "--temperature > 0, got 200 and nan"),
    (["lineval", "--train", "DATA", "--val", "DATA", "--lr", "nan"], "--lr > 0, got 100 and nan"),
    (["demo", "--out", "OUT", "--minutes", "nan"], "--minutes must be positive, got nan"),
    (["bench", "loader", "--data", "DATA", "--seconds", "nan"], "--seconds must be positive"),
])
def test_a_number_that_would_do_nothing_is_one_line(argv: list[str], message: str, photo_train, tmp_path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Each was once silently taken (0 or a negative count as "all CPUs", NaN passing `<= 0`)
    # or failed only after the work, as a traceback.
    argv = [a.replace("DATA", str(photo_train)).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
