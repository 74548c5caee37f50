import pytest

from hf_rlprune.atomic import atomic_write, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "new" / "results.json", "complete")  # the folder is created
    assert path.read_text() == "complete"

    def cut_off(tmp):  # a run killed half-way through writing
        with open(tmp, "w") as handle:
            handle.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(cut_off, path)
    assert path.read_text() == "complete"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
