"""Atomic file writes: results, caches and checkpoints are written beside their path and renamed into place, so a
reader, or a run cut off mid-write (a killed job, a full disk), never sees half a file."""

import os
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
