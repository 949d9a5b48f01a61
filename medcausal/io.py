"""Atomic file writes: a reader never sees a half-written file in place of a good one.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
>>> with atomic_write(path) as tmp:
...     _ = open(tmp, "w").write("done")
>>> open(path).read()
'done'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success move it into place, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_table(df, path: str | os.PathLike) -> None:
    """Write a DataFrame atomically as CSV or Parquet (by suffix), index included if named."""
    path = Path(path)
    keep_index = df.index.name is not None
    with atomic_write(path) as tmp:
        if path.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(tmp, index=keep_index)
        else:
            df.to_csv(tmp, index=keep_index)


def read_table(path: str | os.PathLike):
    """Read a CSV or Parquet table, with a clear error for a missing or unreadable file."""
    import pandas as pd

    from .errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e}") from e
