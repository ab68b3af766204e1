"""Shared fixtures: small slides written with tifffile, so tests need no external data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
STROMA = (214, 120, 170)  # eosin pink
GLASS = (242, 242, 242)


def write_tiled_tiff(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, levels: int = 2, tile: int = 128) -> Path:
    """A generic pyramidal tiled JPEG TIFF that OpenSlide opens (mpp via the TIFF resolution tags)."""
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            ds = 4**level
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
            tw.write(
                np.ascontiguousarray(rgb[::ds, ::ds]),
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if level else 0,
                **extra,
            )
    return path


def write_geojson(path: Path, features: list[dict], bare_list: bool = False) -> Path:
    payload = features if bare_list else {"type": "FeatureCollection", "features": features}
    path.write_text(json.dumps(payload))
    return path


def feature(class_name: str, geometry: dict) -> dict:
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": "annotation", "classification": {"name": class_name}},
    }


def square(x0, y0, x1, y1) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def run_snakemake(
    workdir: Path, configs: list, *args: str, snakefile: Path = REPO / "Snakefile"
) -> subprocess.CompletedProcess:
    """The workflow through the snakemake CLI in workdir, on 2 cores with the CPU profile (what
    `make demo` uses without a GPU: small model jobs side by side, one thread each)."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir)]
    command += ["--configfile", *map(str, configs), "--cores", "2", "--workflow-profile", str(REPO / "profiles/cpu")]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and leave the other core to the rest of the suite."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def square_slide(tmp_path) -> tuple[Path, Path]:
    """1024 px slide at 0.5 mpp: glass with a stroma square [256, 768)^2, and a GeoJSON with a
    'Blood vessel' square [256, 384)^2 and a 'Tissue' outline around the stroma."""
    rgb = np.full((1024, 1024, 3), GLASS, np.uint8)
    rgb[256:768, 256:768] = STROMA
    slide = write_tiled_tiff(tmp_path / "square.tiff", rgb)
    geojson = write_geojson(
        tmp_path / "square.geojson",
        [feature("Tissue", square(240, 240, 784, 784)), feature("Blood vessel", square(256, 256, 384, 384))],
    )
    return slide, geojson


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    """A random-weight resnet18 U-Net (depth 3, 32 px inputs, classes Blood vessel and Fat) saved
    as rule train_segmentation does: a feature space and re-segmenter for quality tests."""
    import torch

    from histosynth.config import section_defaults
    from histosynth.evaluation.segmentation import build_model, save_model

    torch.manual_seed(0)
    settings = section_defaults("segmentation", {"encoder_depth": 3, "decoder_channels": [32, 16, 16]})
    run = tmp_path_factory.mktemp("segmentation")
    (run / "model").mkdir()
    save_model(build_model(settings, 2), run / "model", {"Blood vessel": 1, "Fat": 2}, settings, {})
    return run
