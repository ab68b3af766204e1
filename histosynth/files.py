"""Files on disk that every layer writes or checks: atomic outputs (a failed job leaves nothing
half-written), the model-info file beside each trained model, and sha256 digests of files and
model folders for provenance."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The JSON file written beside every model trained here (its settings, classes and provenance).
MODEL_INFO = "histosynth.json"


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `final` only if the block succeeds,
    so a failed stage leaves no half-written output."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(err, final)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path that is renamed to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial{final.suffix}")
    try:
        yield tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _raise_naming(err, final)
    os.replace(tmp, final)


def _raise_naming(err: BaseException, final: Path):
    """Re-raise `err`; an OSError that names no file (a write that failed: disk full) as one of its
    kind naming the output `final`, so the error says what could not be written."""
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        raise OSError(err.errno, err.strerror, str(final)) from err
    raise err


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def file_hash(path: str | Path) -> str:
    """sha256 hex digest of one file's bytes."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def content_hash(folder: str | Path) -> str:
    """sha256 over a saved model's config and weights (file names and bytes), for provenance."""
    return folder_hash(folder, (".json", ".safetensors"))


def folder_hash(folder: str | Path, suffixes: Iterable[str], recursive: bool = False) -> str:
    """sha256 over the files of `folder` whose suffix is in `suffixes` (with `recursive`, its
    subfolders too), each file's name relative to `folder` and then its bytes, in sorted order."""
    folder, suffixes = Path(folder), set(suffixes)
    files = folder.rglob("*") if recursive else folder.iterdir()
    digest = hashlib.sha256()
    for file in sorted(p for p in files if p.is_file() and p.suffix in suffixes):
        digest.update(str(file.relative_to(folder)).encode())
        _update(digest, file)
    return digest.hexdigest()
