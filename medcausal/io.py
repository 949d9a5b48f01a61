"""Atomic file writes (a reader never sees a half-written file in place of a good one), tables,
and the model-file format shared by every medcausal model.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
>>> with atomic_write(path) as tmp:
...     _ = open(tmp, "w").write("done")
>>> open(path).read()
'done'
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch


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
        # mkstemp creates the file readable by its owner only; give it the mode a plain open()
        # would (0666 less the umask), so collaborators can read saved models and tables.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def weights_digest(state: Mapping) -> str:
    """SHA-256 of a ``state_dict`` (names, dtypes, shapes and values), e.g. to tie a DP ledger
    to the weights it describes.

    >>> import torch
    >>> a = {"w": torch.zeros(2)}
    >>> weights_digest(a) == weights_digest({"w": torch.zeros(2)}) != weights_digest({"w": torch.ones(2)})
    True
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_CSV_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zip": "zip", ".xz": "xz", ".zst": "zstd"}


def write_table(df, path: str | os.PathLike) -> None:
    """Write a DataFrame atomically as CSV or Parquet (by suffix), index included if named.

    A CSV named ``.csv.gz`` (``.bz2``, ``.zip``, ``.xz``, ``.zst``) is compressed, as
    :func:`read_table` (pandas) expects from the name.
    """
    path = Path(path)
    keep_index = any(name is not None for name in df.index.names)  # a MultiIndex has names, no name
    with atomic_write(path) as tmp:
        if path.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(tmp, index=keep_index)
        else:  # the temporary file's name does not say how to compress: the final name does
            df.to_csv(tmp, index=keep_index, compression=_CSV_COMPRESSION.get(path.suffix.lower()))


# read_csv's default missing-value words (its documented ``na_values`` defaults)
_PANDAS_NA_WORDS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def read_table(path: str | os.PathLike, str_columns=()):
    """Read a CSV or Parquet table, with a clear error for a missing or unreadable file.

    ``str_columns`` of a CSV are read as text, so ids like ``"001"`` stay as written.
    """
    import pandas as pd

    from .errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        header = pd.read_csv(path, nrows=0).columns
        text = [c for c in dict.fromkeys(str_columns) if c in header]
        if not text:
            return pd.read_csv(path)
        # As written: "NA" (Namibia), "None", "null" are text here; only an empty field is missing.
        # Other columns keep pandas' default missing-value words (one read, per-column lists).
        na = {c: [""] if c in text else _PANDAS_NA_WORDS for c in header}
        table = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False, na_values=na)
        for c in text:
            table[c] = table[c].astype(object).where(table[c].notna(), None)
        return table
    except Exception as e:
        raise DataError(f"cannot read data file {str(path)!r}: {e}") from e


def save_model_file(path: str | Path, spec: dict, state_dict: Mapping[str, "torch.Tensor"]) -> Path:
    """Atomically write ``{"medcausal": json(spec), "state_dict": tensors on CPU}`` with :func:`torch.save`.

    The one model-file format of medcausal (causal models, single-cell and representation
    models): plain tensors plus a JSON string, so :func:`load_model_file` reads it with
    ``torch.load(weights_only=True)`` and never runs code.
    """
    import torch

    payload = {"medcausal": json.dumps(spec),
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model_file(path: str | Path, expected_format: str, max_version: int, *,
                     what: str = "medcausal model") -> tuple[dict, dict[str, "torch.Tensor"]]:
    """``(spec, state_dict)`` of a file written by :func:`save_model_file`; never runs code.

    Uses ``torch.load(weights_only=True)``. Raises :class:`ModelFileError` naming
    the file when it is missing, unreadable (corrupt, truncated, foreign), a
    torch file without a medcausal payload, of another ``format``, of a newer
    ``format_version`` than ``max_version``, or with an unreadable JSON spec.
    """
    import torch

    from .errors import ModelFileError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{str(path)!r} is not a readable {what} file (corrupt, truncated or foreign): "
                             f"{type(e).__name__}") from None
    if (not isinstance(payload, dict) or not isinstance(payload.get("medcausal"), str)
            or not isinstance(payload.get("state_dict"), dict)):
        raise ModelFileError(f"{str(path)!r} is a torch file but not a {what}")
    try:
        spec = json.loads(payload["medcausal"])
    except ValueError as e:
        raise ModelFileError(f"{str(path)!r} is a damaged {what}: its JSON spec is unreadable ({e})") from None
    if not isinstance(spec, dict):
        raise ModelFileError(f"{str(path)!r} is a damaged {what}: its spec is not a JSON object")
    if spec.get("format") != expected_format:
        raise ModelFileError(f"{str(path)!r} has format {spec.get('format')!r}, not {expected_format!r}")
    version = spec.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{str(path)!r} is a damaged {what}: format_version {version!r} is not an integer")
    if version > max_version:
        written = f", written by medcausal {spec['medcausal_version']}" if spec.get("medcausal_version") else ""
        raise ModelFileError(f"{str(path)!r} has format version {version!r}{written}, newer than this medcausal "
                             f"reads ({max_version}); upgrade to read it")
    return spec, payload["state_dict"]
