"""Tests for histosynth.nuclei.conditioning: encoding, channel expansion, previews and the slide builder."""

import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.nuclei.conditioning import (
    PREVIEW_BACKGROUND,
    PREVIEW_BOUNDARY,
    build_slide_conditioning,
    channel_names,
    conditioning_channels,
    encode_conditioning,
    preview,
    read_conditioning,
    write_conditioning,
)
from histosynth.nuclei.instances import NUCLEUS_CLASSES, NUCLEUS_COLOURS

REGIONS = ["Blood vessel", "Inflammation", "Fat"]


@pytest.fixture
def patch():
    """8x8 patch: region 2 on the right half; a 5x5 nucleus (id 1, immune) and a 2x2 one (id 4,
    tumor) touching it on the right."""
    regions = np.zeros((8, 8), np.uint8)
    regions[:, 4:] = 2
    instances = np.zeros((8, 8), np.uint16)
    instances[1:6, 1:6] = 1
    instances[2:4, 6:8] = 4  # touches instance 1 along column 5|6
    return regions, instances, {1: NUCLEUS_CLASSES.index("immune") + 1, 4: 1}


def test_encoding_channels(patch):
    regions, instances, classes = patch
    encoded = encode_conditioning(regions, instances, classes)
    assert encoded.dtype == np.uint8 and encoded.shape == (8, 8, 3)
    assert np.array_equal(encoded[..., 0], regions)
    assert set(np.unique(encoded[..., 1][instances == 1])) == {3}  # immune
    assert set(np.unique(encoded[..., 1][instances == 4])) == {1}  # tumor
    assert (encoded[..., 1][instances == 0] == 0).all()


def test_boundaries_are_inner_edges_against_background_and_neighbours(patch):
    regions, instances, classes = patch
    boundary = encode_conditioning(regions, instances, classes)[..., 2]
    assert set(np.unique(boundary)) == {0, 255}
    expected = np.zeros((8, 8), bool)
    expected[1:6, 1:6] = True
    expected[2:5, 2:5] = False  # the 5x5 nucleus: a one-pixel ring around its 3x3 interior
    expected[2:4, 6:8] = True  # the 2x2 nucleus is all edge
    assert np.array_equal(boundary == 255, expected)
    assert (boundary[instances == 0] == 0).all()  # background is never boundary (mode "inner")


def test_no_regions_leaves_channel_zero_empty(patch):
    _, instances, classes = patch
    encoded = encode_conditioning(None, instances, classes)
    assert (encoded[..., 0] == 0).all()
    channels = conditioning_channels(encoded, n_region_classes=3)
    assert (channels[0] == 1).all() and (channels[1:4] == 0).all()  # everything "region:background"


def test_nucleus_without_class_is_an_error(patch):
    regions, instances, _ = patch
    with pytest.raises(ValueError, match=r"instances \[4\] have no class"):
        encode_conditioning(regions, instances, {1: 3})


@pytest.mark.parametrize("use_regions, use_nuclei, use_boundaries", list(itertools.product([True, False], repeat=3)))
def test_channel_count_and_order_follow_the_flags(patch, use_regions, use_nuclei, use_boundaries):
    flags = {"use_regions": use_regions, "use_nuclei": use_nuclei, "use_boundaries": use_boundaries}
    names = channel_names(REGIONS, **flags)
    channels = conditioning_channels(encode_conditioning(*patch), len(REGIONS), **flags)
    assert channels.dtype == np.float32 and channels.shape == (len(names), 8, 8)
    expected = (4 if use_regions else 0) + (7 if use_nuclei else 0) + (1 if use_boundaries else 0)
    assert len(names) == expected
    blocks = [n.split(":")[0] for n in names]
    assert blocks == sorted(blocks, key=["region", "nucleus", "nucleus_boundary"].index)


def test_one_hot_values_on_a_hand_made_map():
    encoded = np.zeros((2, 3, 3), np.uint8)
    encoded[..., 0] = [[0, 1, 3], [2, 2, 0]]
    encoded[..., 1] = [[0, 7, 1], [0, 3, 0]]
    encoded[..., 2] = [[0, 255, 0], [0, 255, 0]]
    channels = conditioning_channels(encoded, n_region_classes=3)
    names = channel_names(REGIONS)
    assert names[:4] == ["region:background", "region:Blood vessel", "region:Inflammation", "region:Fat"]
    assert names[4:11] == [f"nucleus:{c}" for c in NUCLEUS_CLASSES] and names[11] == "nucleus_boundary"
    assert np.array_equal(channels[0], [[1, 0, 0], [0, 0, 1]])  # background
    assert np.array_equal(channels[1], [[0, 1, 0], [0, 0, 0]])  # Blood vessel
    assert np.array_equal(channels[2], [[0, 0, 0], [1, 1, 0]])  # Inflammation
    assert np.array_equal(channels[3], [[0, 0, 1], [0, 0, 0]])  # Fat
    assert np.array_equal(channels[4], [[0, 0, 1], [0, 0, 0]])  # tumor (1)
    assert np.array_equal(channels[6], [[0, 0, 0], [0, 1, 0]])  # immune (3)
    assert np.array_equal(channels[10], [[0, 1, 0], [0, 0, 0]])  # other (7)
    assert np.array_equal(channels[11], [[0, 1, 0], [0, 1, 0]])  # boundary
    assert np.array_equal(channels[:4].sum(0), np.ones((2, 3)))  # regions are one-hot
    assert np.array_equal(channels[4:11].sum(0), (encoded[..., 1] > 0).astype(np.float32))  # no background channel
    batch = conditioning_channels(np.stack([encoded, encoded]), n_region_classes=3)
    assert batch.shape == (2, 12, 2, 3) and np.array_equal(batch[1], channels)


def test_class_indices_beyond_the_settings_are_rejected():
    encoded = np.zeros((2, 2, 3), np.uint8)
    encoded[0, 0, 0] = 4
    with pytest.raises(ValueError, match="n_region_classes=3"):
        conditioning_channels(encoded, n_region_classes=3)
    assert conditioning_channels(encoded, n_region_classes=3, use_regions=False).shape == (8, 2, 2)


def test_write_read_and_preview(patch, tmp_path):
    encoded = encode_conditioning(*patch)
    write_conditioning(encoded, tmp_path / "c.png")
    assert np.array_equal(read_conditioning(tmp_path / "c.png"), encoded)
    Image.fromarray(encoded[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="grey.png: a conditioning map is an RGB PNG"):
        read_conditioning(tmp_path / "grey.png")
    shown = preview(encoded)
    assert shown.dtype == np.uint8 and shown.shape == (8, 8, 3)
    assert tuple(shown[7, 0]) == PREVIEW_BACKGROUND  # no region, no nucleus
    assert tuple(shown[7, 7]) != PREVIEW_BACKGROUND  # region 2 is tinted
    assert tuple(shown[3, 3]) == NUCLEUS_COLOURS["immune"]  # interior of nucleus 1
    assert tuple(shown[1, 1]) == PREVIEW_BOUNDARY


def test_build_slide_conditioning(patch, tmp_path):
    regions, instances, _ = patch
    Image.fromarray(regions).save(tmp_path / "p1_mask.png")
    Image.fromarray(np.zeros_like(regions)).save(tmp_path / "p2_mask.png")
    nuclei_dir = tmp_path / "nuclei"
    nuclei_dir.mkdir()
    Image.fromarray(instances).save(nuclei_dir / "p1.png")
    Image.fromarray(np.zeros_like(instances)).save(nuclei_dir / "p2.png")
    index = pd.DataFrame(
        {"patch_id": ["p1", "p2"], "mask": [str(tmp_path / "p1_mask.png"), str(tmp_path / "p2_mask.png")]}
    )
    table = pd.DataFrame({"patch_id": ["p1", "p1"], "instance_id": [1, 4], "class": ["immune", "tumor"]})
    assert build_slide_conditioning(index, nuclei_dir, table, tmp_path / "cond", progress=False) == 2
    first = read_conditioning(tmp_path / "cond" / "p1.png")
    assert np.array_equal(first, encode_conditioning(regions, instances, {1: 3, 4: 1}))
    assert not read_conditioning(tmp_path / "cond" / "p2.png").any()  # a patch without nuclei or regions
    build_slide_conditioning(index, nuclei_dir, table, tmp_path / "nuclei_only", use_regions=False, progress=False)
    assert not read_conditioning(tmp_path / "nuclei_only" / "p1.png")[..., 0].any()
    build_slide_conditioning(index, nuclei_dir, table, tmp_path / "forked", progress=False, workers=2)
    for name in ("p1.png", "p2.png"):  # the same maps from 2 processes, byte for byte
        assert (tmp_path / "forked" / name).read_bytes() == (tmp_path / "cond" / name).read_bytes()
    (nuclei_dir / "p2.png").unlink()
    for workers in (1, 2):
        with pytest.raises(FileNotFoundError, match="p2.png: no nuclei mask for patch p2"):
            build_slide_conditioning(index, nuclei_dir, table, tmp_path / "cond", progress=False, workers=workers)
    assert (tmp_path / "cond" / "p1.png").is_file()  # the failed rebuild left the old output alone
