import numpy as np
import pytest

from conftest import GLASS, STROMA, write_tiled_tiff
from histosynth.config import section_defaults
from histosynth.data.slides import Slide, SlideError, detect_tissue


def tissue(**overrides) -> dict:
    """The patches.tissue settings (schema defaults) with `overrides`."""
    return section_defaults("patches", {"tissue": overrides})["tissue"]


def test_reads_mpp_levels_and_best_level(square_slide):
    with Slide(square_slide[0]) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.dimensions == (1024, 1024)
        assert slide.level_for(0.5) == 0
        assert slide.level_for(1.9) == 0  # level 1 (2.0 mpp) would be coarser than asked
        assert slide.level_for(2.0) == 1
        assert slide.level_for(16.0) == 1


def test_read_resamples_to_the_requested_size(square_slide):
    with Slide(square_slide[0]) as slide:
        inside = slide.read(300, 300, 200, 200, (50, 50))
        outside = slide.read(0, 0, 200, 200, (50, 50))
    assert inside.shape == (50, 50, 3) and inside.dtype == np.uint8
    assert np.abs(inside.mean((0, 1)) - STROMA).max() < 8
    assert np.abs(outside.mean((0, 1)) - GLASS).max() < 8


def test_missing_mpp_uses_fallback_with_a_warning(tmp_path, caplog):
    path = write_tiled_tiff(tmp_path / "nompp.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=None, levels=1)
    with Slide(path, fallback_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    assert "nompp.tiff" in caplog.text and "fallback_mpp" in caplog.text


def test_mpp_override_wins(square_slide):
    with Slide(square_slide[0], mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_not_a_slide_names_the_file(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("not an image")
    with pytest.raises(SlideError, match="notes.svs"):
        Slide(path)


def test_truncated_slide_fails_with_a_clear_error(square_slide, tmp_path):
    data = square_slide[0].read_bytes()
    path = tmp_path / "truncated.tiff"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated"):
        with Slide(path) as slide:
            slide.render(2.0)


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="no such slide file"):
        Slide(tmp_path / "absent.svs")


def test_tissue_detection_rejects_glass_and_pen():
    rgb = np.full((100, 100, 3), GLASS, np.uint8)
    rgb[20:60, 20:60] = STROMA
    rgb[70:90, 10:90] = (40, 60, 200)  # blue marker
    mask, threshold = detect_tissue(rgb, 8.0, tissue(min_object_um2=0, max_hole_um2=0))
    assert mask[20:60, 20:60].all()
    assert not mask[70:90, 10:90].any()
    assert mask.sum() == 40 * 40
    assert threshold >= tissue()["min_saturation"]


def test_a_tile_of_tissue_throughout_is_tissue_without_otsu():
    noise = np.random.default_rng(0).normal(0, 3, (64, 64, 3))
    rgb = (np.array([215, 162, 186]) + noise).clip(0, 255).astype(np.uint8)  # pale stroma (saturation ~0.24)...
    rgb[::2, ::2] = (110, 55, 150)  # ...and dark nuclei, a quarter of the pixels: Otsu splits the two
    split, threshold = detect_tissue(rgb, 8.0, tissue(min_object_um2=0, max_hole_um2=0))
    assert threshold > 0.3 and split[::2, ::2].all() and split[1::2, 1::2].mean() < 0.01  # stroma dropped
    whole, threshold = detect_tissue(rgb, 8.0, tissue(otsu=False, min_object_um2=0, max_hole_um2=0))
    assert threshold == tissue()["min_saturation"] and whole.all()


def test_blank_glass_has_no_tissue():
    rgb = np.random.default_rng(0).integers(236, 246, (64, 64, 3)).astype(np.uint8)
    mask, _ = detect_tissue(rgb, 8.0, tissue())
    assert not mask.any()


def test_small_holes_filled_and_debris_removed():
    rgb = np.full((100, 100, 3), GLASS, np.uint8)
    rgb[10:90, 10:90] = STROMA
    rgb[40:43, 40:43] = GLASS  # hole of 9 px = 576 um2 at 8 mpp
    rgb[95:97, 95:97] = STROMA  # debris of 4 px = 256 um2
    mask, _ = detect_tissue(rgb, 8.0, tissue(min_object_um2=300, max_hole_um2=600))
    assert mask[40:43, 40:43].all()
    assert not mask[95:97, 95:97].any()


class _WithThumbnail:
    """An OpenSlide handle that also has an associated 'thumbnail' image."""

    def __init__(self, osr, thumbnail):
        self._osr, self.associated_images = osr, {"thumbnail": thumbnail}

    def __getattr__(self, name):
        return getattr(self._osr, name)


def test_render_takes_the_thumbnail_when_it_suffices(square_slide):
    from PIL import Image

    with Slide(square_slide[0]) as slide:  # 1024 px at 0.5 mpp; level 1 is 256 px at 2 mpp
        pyramid = slide.render(8.0)
        red = Image.new("RGBA", (128, 128), (200, 0, 0, 255))  # 4 mpp, marked so that its use shows
        slide.osr = _WithThumbnail(slide.osr, red)
        assert (slide.render(8.0) == (200, 0, 0)).all()  # 64 px from the 128 px thumbnail, not level 1
        assert slide.render(8.0).shape == pyramid.shape
        assert not (slide.render(2.0) == (200, 0, 0)).all(axis=-1).any()  # too coarse for 2 mpp: the pyramid
        slide.osr = _WithThumbnail(slide.osr._osr, Image.new("RGBA", (128, 64), (200, 0, 0, 255)))
        assert np.array_equal(slide.render(8.0), pyramid)  # another aspect ratio: a glass overview, not the scan


def test_render_reads_chunks_in_parallel_the_same(square_slide, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import histosynth.data.slides as slides

    monkeypatch.setattr(slides, "READ_CHUNK", 100)  # many chunks
    with Slide(square_slide[0]) as slide, ThreadPoolExecutor(3) as pool:
        assert np.array_equal(slide.render(0.7, pool), slide.render(0.7))


def test_hsv_and_otsu_match_scikit_image():
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    from histosynth.data.slides import otsu_threshold, rgb_to_hsv

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[:4] = rgb[:4, :, :1]  # greys: no hue, no saturation
    rgb[4:6] = 0
    assert np.allclose(rgb_to_hsv(rgb), rgb2hsv(rgb), rtol=0, atol=1e-12)
    bimodal = np.concatenate([rng.normal(60, 10, 900), rng.normal(170, 20, 700)]).clip(0, 255).astype(np.uint8)
    for values in (bimodal, rng.integers(30, 200, (32, 32)).astype(np.uint8), np.array([3, 3, 9], np.uint8)):
        assert otsu_threshold(values) == threshold_otsu(values)
