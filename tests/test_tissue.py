"""Tissue detection (histosynth.data.tissue): glass or none, ink, holes, and what extraction keeps
of drawn tiles that are tissue throughout or have glass around their tissue."""

import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.config import load_config, section_defaults
from histosynth.data.patches import PatchError, extract_slide
from histosynth.data.tissue import detect_tissue, detection_mpp, otsu_threshold, rgb_to_hsv

from conftest import GLASS, STROMA

DENSE_NUCLEI = (80, 45, 130)
PALE = (228, 205, 222)  # pale, mucinous-looking tissue: saturation 0.10, value 0.89
BLUE_PEN, GREEN_PEN, RED_PEN, BLACK_PEN = (40, 60, 200), (40, 150, 70), (205, 30, 35), (45, 45, 50)


def tissue(**overrides) -> dict:
    """The patches.tissue settings (schema defaults) with `overrides`."""
    return section_defaults("patches", {"tissue": overrides})["tissue"]


def tile_of_tissue(size: int, seed: int = 0) -> np.ndarray:
    """A tile that is tissue throughout: its left half dense (stroma crowded with nuclei), its right
    half pale with few nuclei and a small white lumen inside it."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((size, size, 3), np.float64)
    rgb[:, : size // 2] = STROMA
    rgb[:, size // 2 :] = PALE
    yy, xx = np.mgrid[:size, :size]
    for count, left, right in ((size // 3, 0, size // 2), (size // 40, size // 2, size)):
        for x, y in zip(rng.integers(left, right, count), rng.integers(0, size, count), strict=True):
            rgb[(xx - x) ** 2 + (yy - y) ** 2 < (size // 60) ** 2] = DENSE_NUCLEI
    cx, cy, r = 3 * size // 4, size // 2, size // 16
    rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = GLASS  # a lumen, enclosed by pale tissue
    return (rgb + rng.normal(0, 4, rgb.shape)).clip(0, 255).astype(np.uint8)


def tile_with_glass(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Glass with a disc of stroma in its middle; the image and the disc's mask."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.3 * size) ** 2
    rgb = np.full((size, size, 3), GLASS, np.uint8)
    rgb[disc] = STROMA
    return rgb, disc


def test_a_tile_of_tissue_throughout_is_tissue_with_the_defaults():
    rgb = tile_of_tissue(256)
    found = detect_tissue(rgb, 1.0, tissue())
    assert not found.has_glass and found.mask.all()  # pale half and lumen included
    split = detect_tissue(rgb, 1.0, tissue(min_glass=0.0))  # forced to split tissue from "glass": Otsu
    assert split.has_glass and split.threshold > 0.15 and split.mask[:, 160:].mean() < 0.2  # drops the pale half


def test_a_tile_with_glass_keeps_only_its_tissue():
    rgb, disc = tile_with_glass(100)
    rgb[70:90, 10:90] = BLUE_PEN  # a marker line on the glass
    rgb[48:52, 30:70] = GREEN_PEN  # and one across the tissue
    found = detect_tissue(rgb, 8.0, tissue(min_object_um2=0, max_hole_um2=0))
    assert found.has_glass and found.threshold >= tissue()["min_saturation"]
    expected = disc.copy()
    expected[70:90, 10:90] = expected[48:52, 30:70] = False
    assert np.array_equal(found.mask, expected)  # the tissue, less the ink; none of the glass


def test_blank_glass_has_no_tissue():
    rgb = np.random.default_rng(0).integers(236, 246, (64, 64, 3)).astype(np.uint8)
    found = detect_tissue(rgb, 8.0, tissue())
    assert found.has_glass and not found.mask.any()


def test_red_and_black_ink_are_not_tissue_but_eosin_is():
    rgb = tile_of_tissue(128)
    rgb[10:30, 10:120] = RED_PEN
    rgb[90:100, 5:120] = BLACK_PEN
    rgb[60:70, 5:60] = (235, 90, 150)  # saturated eosin pink: hue 0.92
    found = detect_tissue(rgb, 1.0, tissue(max_hole_um2=0))
    assert not found.mask[10:30, 10:120].any() and not found.mask[90:100, 5:120].any()
    assert found.mask[60:70, 5:60].all()
    assert 0.15 < found.ink_share < 0.25
    assert detect_tissue(rgb, 1.0, tissue(max_hole_um2=0, reject_pen=False)).mask[10:30, 10:120].all()


def test_only_enclosed_background_is_a_hole():
    rgb = np.full((60, 60, 3), GLASS, np.uint8)
    rgb[:, 20:40] = STROMA  # a band of tissue with glass on both sides, each touching the edge
    rgb[28:32, 28:32] = GLASS  # a hole of 16 px inside the band
    found = detect_tissue(rgb, 8.0, tissue(min_object_um2=0))
    assert found.mask[28:32, 28:32].all()  # the enclosed hole is filled
    assert not found.mask[:, :20].any() and not found.mask[:, 40:].any()
    strip = detect_tissue(rgb[:12, 14:46], 8.0, tissue(min_object_um2=0, max_hole_um2=1e9))  # any size is small
    assert (
        strip.mask[:, 6:26].all() and not strip.mask[:, :6].any() and not strip.mask[:, 26:].any()
    )  # open to the edge


def test_small_holes_filled_and_debris_removed():
    rgb = np.full((100, 100, 3), GLASS, np.uint8)
    rgb[10:90, 10:90] = STROMA
    rgb[40:43, 40:43] = GLASS  # hole of 9 px = 576 um2 at 8 mpp
    rgb[95:97, 95:97] = STROMA  # debris of 4 px = 256 um2
    found = detect_tissue(rgb, 8.0, tissue(min_object_um2=300, max_hole_um2=600))
    assert found.mask[40:43, 40:43].all()
    assert not found.mask[95:97, 95:97].any()


def test_small_images_are_detected_finer():
    assert detection_mpp(0.25, (1000, 1000), 8.0) == pytest.approx(250 / 256)  # a 250 um tile: 256 px, not 31
    assert detection_mpp(0.25, (100000, 80000), 8.0) == 8.0  # a slide: as configured
    assert detection_mpp(0.5, (300, 300), 8.0) == pytest.approx(150 / 256)
    assert detection_mpp(0.5, (200, 300), 8.0) == 0.5  # never finer than the image


@pytest.fixture
def config():
    config = load_config()
    config["patches"].update(size=64, stride=64, mpp=0.5)  # 32 um windows on 0.25 mpp tiles
    return config


def extract_png(rgb, tmp_path, config, name="tile"):
    path = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(path)
    out = tmp_path / "out"
    index = extract_slide(
        path,
        None,
        out / name,
        out / f"{name}.parquet",
        out / f"{name}.qc.png",
        slide_name=name,
        split="train",
        config=config,
        mpp=0.25,
        progress=False,
        workers=1,
    )
    return pd.read_parquet(index)


def test_extraction_keeps_every_window_of_a_tile_of_tissue(tmp_path, config, caplog):
    caplog.set_level(logging.INFO)
    index = extract_png(tile_of_tissue(1024), tmp_path, config)
    assert len(index) == 64 and (index["tissue_fraction"] == 1.0).all()  # 8 x 8 windows of 128 px
    assert "kept 64 of 64 windows that fit" in caplog.text and "no glass" in caplog.text
    assert "WARNING" not in caplog.text


def test_extraction_of_a_tile_with_glass_keeps_its_tissue_and_warns(tmp_path, config, caplog):
    caplog.set_level(logging.INFO)
    rgb, disc = tile_with_glass(1024)
    index = extract_png(rgb, tmp_path, config)
    truth = {(x, y): disc[y : y + 128, x : x + 128].mean() for x in range(0, 1024, 128) for y in range(0, 1024, 128)}
    kept = set(zip(index["x"], index["y"], strict=True))
    assert all(truth[xy] >= 0.4 for xy in kept)
    assert all(xy in kept for xy, share in truth.items() if share >= 0.6)
    assert "glass found" in caplog.text and "plain image that keeps" in caplog.text  # under half of 64 kept
    qc = np.asarray(Image.open(tmp_path / "out" / "tile.qc.png"))
    assert (np.abs(qc[10:60, 900:1000].astype(int) - GLASS).sum(-1) > 60).all()  # the glass is shaded


@pytest.mark.parametrize("pen", [None, BLUE_PEN, RED_PEN])
def test_a_blank_glass_tile_yields_no_patches(tmp_path, config, pen):
    """histolab's kind of fixtures: 512 px at 0.25 um/px of blank glass, with a pen line, with a red smear."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(236, 246, (512, 512, 3)).astype(np.uint8)
    if pen is not None:
        rgb[200:260, :] = (np.array(pen) + rng.normal(0, 5, (60, 512, 3))).clip(0, 255)  # across the tile
    with pytest.raises(PatchError, match="no tissue detected.*glass found"):
        extract_png(rgb, tmp_path, config, name="glass")
    assert not (tmp_path / "out" / "glass").exists() and not (tmp_path / "out" / "glass.parquet").exists()


def test_hsv_and_otsu_match_scikit_image():
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[:4] = rgb[:4, :, :1]  # greys: no hue, no saturation
    rgb[4:6] = 0
    assert np.allclose(rgb_to_hsv(rgb), rgb2hsv(rgb), rtol=0, atol=1e-12)
    bimodal = np.concatenate([rng.normal(60, 10, 900), rng.normal(170, 20, 700)]).clip(0, 255).astype(np.uint8)
    for values in (bimodal, rng.integers(30, 200, (32, 32)).astype(np.uint8), np.array([3, 3, 9], np.uint8)):
        assert otsu_threshold(values) == threshold_otsu(values)
