"""Atomic file writes: results, caches and checkpoints are written beside their path and renamed into place, so a
reader, or a run cut off mid-write (a killed job, a full disk), never sees half a file."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(write, path: str | os.PathLike) -> Path:
    """Call `write(tmp_path)` for a temporary file in `path`'s folder (created if missing), then rename it to `path`.
    If `write` fails, `path` keeps what it held and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`path.write_text(text)`, atomically."""
    return atomic_write(lambda tmp: Path(tmp).write_text(text), path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside `path` to write a whole folder into (a saved model). When the block ends without an
    error the staging folder replaces `path` by rename, and any previous folder is removed only after the swap;
    otherwise the staging folder is removed and `path` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if not path.exists() and old.exists():  # the swap failed half-way: put the previous folder back
            os.replace(old, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
