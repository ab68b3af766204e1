import numpy as np
import pytest

from histosynth.data.slides import Slide, SlideError

from conftest import GLASS, STROMA, write_tiled_tiff


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
