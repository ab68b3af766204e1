"""Dataset readers and writers shared by the stages: images, masks, tables and patch indexes, written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from histosynth.files import atomic_file

if TYPE_CHECKING:
    import pandas as pd

# libpng settings of each PNG compression (config patches.png_compression): "fast", what every stage
# writes, is zlib level 1 with its run-length strategy after the Paeth row filter: on H&E patches 3.5x
# faster to encode than Pillow's default and the files no larger (written often, read rarely).
PNG_COMPRESSION = {
    "fast": {"level": 1, "strategy": imagecodecs.PNG.STRATEGY.RLE, "filter": imagecodecs.PNG.FILTER.PAETH},
    "deflate": {"level": 6},
    "none": {"level": 0},
}


def write_png(array: np.ndarray, path: str | Path, compression: str = "fast") -> None:
    """Write an image array (RGB uint8, label uint8 or instance uint16) as PNG."""
    Path(path).write_bytes(imagecodecs.png_encode(np.ascontiguousarray(array), **PNG_COMPRESSION[compression]))


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """A label or instance mask PNG as stored (uint8 class indices, uint16 instance ids)."""
    with Image.open(path) as image:
        return np.asarray(image)


def arrow_table(rows: Sequence[dict]) -> pa.Table:
    """Rows with the same keys and str, int, float or None values as an Arrow table: a column of
    ints stays int64, with any float float64, with any str (or only None) a string column; None is
    null. Built from Arrow buffers because pyarrow's converters (pa.array, Table.from_pylist) import
    pandas on first use, a quarter of `histosynth patches`' run time."""
    names = list(rows[0])
    return pa.Table.from_arrays([_arrow_column(name, [row[name] for row in rows]) for name in names], names=names)


def _arrow_column(name: str, values: list) -> pa.Array:
    valid = np.array([value is not None for value in values], bool)
    nulls = len(values) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    present = [value for value in values if value is not None]
    if all(isinstance(value, str) for value in present):
        encoded = [value.encode() if value is not None else b"" for value in values]
        offsets = np.zeros(len(values) + 1, np.int32)
        np.cumsum([len(text) for text in encoded], out=offsets[1:])
        buffers = [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
        return pa.Array.from_buffers(pa.string(), len(values), buffers, null_count=nulls)
    if not all(
        isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) for value in present
    ):
        kinds = sorted({type(value).__name__ for value in present})
        raise TypeError(
            f"column {name!r}: values must be all str or all numbers (None allowed), got {', '.join(kinds)}"
        )
    floating = any(isinstance(value, (float, np.floating)) for value in present)
    data = np.array([value if value is not None else 0 for value in values], np.float64 if floating else np.int64)
    return pa.Array.from_buffers(
        pa.float64() if floating else pa.int64(), len(values), [bitmap, pa.py_buffer(data)], null_count=nulls
    )


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write a parquet table atomically."""
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a CSV table atomically; return its path."""
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def write_relative(table: pd.DataFrame, path: str | Path, columns: Sequence[str]) -> None:
    """Write a table whose file `columns` hold absolute (or working-directory) paths with those
    paths relative to the table's folder, as read_patch_index reads them back (atomically)."""
    import pandas as pd

    path = Path(path)
    folder = path.parent.resolve()
    out = table.copy()
    for column in columns:
        out[column] = [None if pd.isna(p) else os.path.relpath(Path(p).resolve(), folder) for p in out[column]]
    write_table(out, path)


FILE_COLUMNS = (
    "image",
    "mask",
    "conditioning",
)  # the file columns patch indexes and the tables derived from them may hold


def read_file_table(path: str | Path) -> pd.DataFrame:
    """read_patch_index with every FILE_COLUMNS column the table has made absolute (conditioning
    indexes, synthetic manifests, curated sets)."""
    names = pq.read_schema(path).names
    return read_patch_index(path, columns=tuple(c for c in FILE_COLUMNS if c in names))


def read_patch_index(path: str | Path, columns: tuple[str, ...] = ("image", "mask")) -> pd.DataFrame:
    """Read a patch index (or a table derived from one) and make its file columns absolute:
    they are stored relative to the table's folder; missing files (a GAN image's mask) stay None."""
    import pandas as pd

    path = Path(path)
    df = pd.read_parquet(path)
    for column in columns:
        df[column] = [None if pd.isna(p) else str(path.parent / p) for p in df[column]]
    return df
