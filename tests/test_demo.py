from collections.abc import Callable
from pathlib import Path

import pytest

from mveb.demo import Stages


def test_a_failing_stage_is_reported_and_the_next_still_runs() -> None:
    st = Stages()
    assert st.run("broken", lambda: (_ for _ in ()).throw(ValueError("no photos"))) is None
    assert st.run("fine", lambda: 41 + 1, lambda v: f"value {v}") == 42
    table = st.table()
    assert "skipped: ValueError: no photos" in table
    assert "value 42" in table
    assert [row[0] for row in st.rows] == ["broken", "fine"]


def test_an_unwritable_out_is_one_line_before_any_stage(unwritable: Callable[[str], Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """It once ended in a FileNotFoundError traceback from mkdir."""
    from mveb.cli import main

    out = unwritable("demo")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mveb demo: error: --out {out}: "), err
