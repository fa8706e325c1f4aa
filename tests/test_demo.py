from mveb.demo import Stages


def test_a_failing_stage_is_reported_and_the_next_still_runs() -> None:
    st = Stages()
    assert st.run("broken", lambda: (_ for _ in ()).throw(ValueError("no photos"))) is None
    assert st.run("fine", lambda: 41 + 1, lambda v: f"value {v}") == 42
    table = st.table()
    assert "skipped: ValueError: no photos" in table
    assert "value 42" in table
    assert [row[0] for row in st.rows] == ["broken", "fine"]
