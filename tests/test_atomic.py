import pytest

from hf_rlprune.atomic import atomic_directory, atomic_write, write_text_atomic


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


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("first")
    assert [p.name for p in target.iterdir()] == ["config.json"]
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:  # cut off half-way through a save
        (staging / "config.json").write_text("second")
        raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "first"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("third")
    assert [p.name for p in target.iterdir()] == ["weights"]  # the previous folder's files are gone with it
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or old folder left behind
