"""Tests for histosynth.nuclei: the classical detector on drawn nuclei, the TorchScript path with
a tiny scripted model, resizing, GeoJSON round trips and the slide and folder drivers."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage.draw import disk, ellipse

from histosynth.config import ConfigError, section_defaults
from histosynth.nuclei.classical import detect_nuclei
from histosynth.nuclei.geojson import NucleusRasterizer, nuclei_geojson, nucleus_features
from histosynth.nuclei.instances import TABLE_COLUMNS, NucleiError, read_instances
from histosynth.nuclei.metrics import match_instances, score_instances
from histosynth.nuclei.model import detect_with_model, load_detector
from histosynth.nuclei.stage import detector_settings, segment_images, segment_patch, segment_slide_patches

from conftest import write_tiled_tiff

EOSIN = (214, 120, 170)
HEMATOXYLIN = (80, 50, 140)
RED_CELL = (205, 40, 60)
FIELD = [(20, 20), (20, 60), (20, 100), (60, 30), (60, 75), (60, 110), (100, 15), (100, 55), (100, 95), (105, 120)]


def draw(shape, shapes, colour=HEMATOXYLIN, seed=0, base=None):
    """H&E-like image: eosin pink with the given boolean shapes painted, plus sensor noise; and
    the ground-truth instances (shape i has id i + 1)."""
    rgb = np.empty((*shape, 3), np.float32) if base is None else base.astype(np.float32)
    if base is None:
        rgb[:] = EOSIN
    truth = np.zeros(shape, np.int32)
    for i, (rr, cc) in enumerate(shapes):
        rgb[rr, cc] = colour
        truth[rr, cc] = i + 1
    rgb += np.random.default_rng(seed).normal(0, 5, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def discs(centres, radius, shape):
    return [disk(c, radius, shape=shape) for c in centres]


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


# --- classical detector ------------------------------------------------------------------------


def test_touching_discs_are_split():
    # radius 8 px at 0.25 mpp (2 µm), centres 15 px apart: the discs overlap in a narrow neck
    rgb, truth = draw((64, 64), discs([(32, 24), (32, 39)], 8, (64, 64)))
    instances, table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    assert instances.dtype == np.uint16 and instances.max() == 2 and len(table) == 2
    for disc_id in (1, 2):
        overlapping = np.bincount(instances[truth == disc_id], minlength=3)[1:]
        best = overlapping.argmax() + 1
        assert iou(instances == best, truth == disc_id) > 0.7
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["centroid_x"].sort_values().to_numpy() == pytest.approx([24, 39], abs=1.5)


def test_field_of_discs_is_detected():
    rgb, truth = draw((128, 128), discs(FIELD, 8, (128, 128)))
    instances, table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    assert score_instances([(truth, instances)])["f1"] >= 0.9
    # within a pixel of the radius: smoothing and hysteresis grow sharp edges by about one pixel
    assert table["area"].to_numpy() == pytest.approx(np.pi * 8.5**2, rel=0.15)
    assert (table["score"] == 1.0).all() and (table["hematoxylin"] > 0.05).all()


def test_empty_patch_gives_no_nuclei():
    rgb, _ = draw((64, 64), [])
    instances, table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    assert not instances.any() and instances.shape == (64, 64)
    assert table.empty and list(table.columns) == list(TABLE_COLUMNS)


def test_sizes_scale_with_mpp():
    params = section_defaults("nuclei")
    small, _ = draw((128, 128), discs(FIELD, 8, (128, 128)))
    large, truth = draw((256, 256), discs([(2 * r, 2 * c) for r, c in FIELD], 16, (256, 256)))
    touching, _ = draw((128, 128), discs([(64, 48), (64, 78)], 16, (128, 128)))
    assert detect_nuclei(small, 0.25, params)[0].max() == detect_nuclei(large, 0.125, params)[0].max() == len(FIELD)
    assert detect_nuclei(touching, 0.125, params)[0].max() == 2
    # the same pixels read at 4x finer resolution are nuclei of 0.8 µm², below min_area_um2, and
    # at 16x coarser, of 3200 µm², above max_area_um2
    assert detect_nuclei(small, 0.0625, params)[0].max() == detect_nuclei(small, 4.0, params)[0].max() == 0


def test_packed_cluster_is_thresholded_again():
    # nuclei packed in an L of pale purple cytoplasm: the image's threshold takes the cytoplasm
    # with them as one object far above max_area_um2; its own threshold separates them
    shape = (160, 160)
    base = np.empty((*shape, 3), np.float32)
    base[:] = EOSIN
    cytoplasm = np.zeros(shape, bool)
    cytoplasm[20:140, 20:70] = cytoplasm[90:140, 20:140] = True
    base[cytoplasm] = (150, 95, 165)
    centres = [(r, c) for r in range(34, 140, 24) for c in range(34, 140, 24) if cytoplasm[r, c]]
    rgb, truth = draw(shape, discs(centres, 9, shape), base=base)
    params = section_defaults("nuclei")
    assert score_instances([(truth, detect_nuclei(rgb, 0.25, params)[0])])["f1"] == 1.0
    assert detect_nuclei(rgb, 0.25, {**params, "refine_rounds": 0})[0].max() == 0


def test_large_uniform_blob_is_not_cut_into_nuclei():
    # one dark disc of 700 µm², convex and without gaps: dropped whole at any resolution, never
    # cut into fake nuclei at pixel noise by a threshold of its own
    params = section_defaults("nuclei")
    for radius, mpp in [(30, 0.5), (60, 0.25), (15, 1.0)]:
        rgb, _ = draw((160, 160), discs([(80, 80)], radius, (160, 160)))
        assert detect_nuclei(rgb, mpp, params)[0].max() == 0, mpp


def test_spindle_nucleus_stays_whole():
    # 1.5 x 8 µm: the blob response peaks at both ends, but the border between them is no neck
    shape = (48, 96)
    rgb, truth = draw(shape, [ellipse(24, 48, 3, 16, shape=shape)])
    instances, table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    assert instances.max() == 1 and iou(instances > 0, truth > 0) > 0.7
    assert list(table["class"]) == ["stromal"]
    split, _ = detect_nuclei(rgb, 0.25, section_defaults("nuclei", {"merge_neck_ratio": 2.0, "min_area_um2": 1.0}))
    assert split.max() == 2


def test_heuristic_classes():
    shape = (96, 96)
    rgb, _ = draw(shape, [disk((20, 20), 9, shape=shape), ellipse(20, 65, 3, 16, shape=shape)])
    rgb, _ = draw(shape, [disk((70, 40), 12, shape=shape)], colour=RED_CELL, base=rgb)
    instances, table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    centres = zip(table["centroid_y"] / 10, table["centroid_x"] / 10, table["class"])
    by_position = {(round(y), round(x)): name for y, x, name in centres}
    assert by_position == {(2, 2): "immune", (2, 6): "stromal", (7, 4): "blood"}


# --- resizing ----------------------------------------------------------------------------------


def test_segment_patch_resizes_and_keeps_ids():
    rgb, truth = draw((128, 128), discs(FIELD, 8, (128, 128)))
    full, full_table = detect_nuclei(rgb, 0.25, section_defaults("nuclei"))
    instances, table = segment_patch(rgb, 0.25, (64, 64), section_defaults("nuclei", {"mpp": 0.25}))
    assert instances.shape == (64, 64) and instances.dtype == np.uint16
    assert set(np.unique(instances)) - {0} == set(table["instance_id"]) == set(full_table["instance_id"])
    assert table["area"].to_numpy() == pytest.approx(full_table["area"].to_numpy() / 4, rel=0.2)
    assert list(table["class"]) == list(full_table["class"])
    # an image at 0.125 mpp is downsampled to the detector's 0.25 first, then resized back
    big = np.asarray(Image.fromarray(rgb).resize((256, 256), Image.Resampling.BICUBIC))
    again, _ = segment_patch(big, 0.125, (256, 256), section_defaults("nuclei", {"mpp": 0.25}))
    assert again.max() == len(FIELD)


def test_vanishing_instances_leave_the_table():
    rgb, _ = draw((64, 64), [disk((20, 20), 8, shape=(64, 64)), disk((45, 45), 3, shape=(64, 64))])
    params = section_defaults("nuclei", {"min_area_um2": 1.0})
    _, full_table = segment_patch(rgb, 0.25, (64, 64), params)
    instances, table = segment_patch(rgb, 0.25, (4, 4), params)
    assert len(full_table) == 2 and len(table) == 1
    assert set(np.unique(instances)) - {0} == set(table["instance_id"])


# --- learned model -----------------------------------------------------------------------------


class ThresholdDetector(torch.nn.Module):
    """Dark pixels, 8-connected components by max-pool label propagation; components above 150
    px are 'big_cell', smaller ones 'lymph'."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        dark = (x[0].mean(0) < 0.5).float()
        h, w = dark.shape
        labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * dark
        while True:
            grown = torch.nn.functional.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * dark
            if torch.equal(grown, labels):
                break
            labels = grown
        values, inverse = torch.unique(labels, return_inverse=True)
        if bool(values[0] != 0):
            inverse = inverse + 1
        n = int(inverse.max())
        areas = torch.bincount(inverse.flatten(), minlength=n + 1)[1:]
        classes: list[str] = []
        area_list: list[int] = areas.tolist()
        for area in area_list:
            classes.append("big_cell" if area > 150 else "lymph")
        return inverse, classes, torch.linspace(0.5, 1.0, n)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "detector.pt"
    with pytest.warns(FutureWarning):  # TorchScript is deprecated upstream; still the format with class names
        torch.jit.script(ThresholdDetector()).save(str(path))
    return path


# 96 px tiles with 16 px of context, rounded up to 32: the model sees 160 x 160 windows
MODEL_PARAMS = section_defaults(
    "nuclei", {"model_mpp": 0.25, "model_classes": {"big_cell": "tumor", "lymph": "immune"}, "tile": 96, "pad": 16}
)


def test_model_through_tiles_recovers_instances_and_classes(model_path):
    shape = (150, 200)  # 2 x 3 tiles
    # discs on the tile borders (row 96; columns 96, 192), on a tile corner, and inside tiles
    big = discs([(96, 96), (30, 96), (96, 150), (120, 192), (20, 20)], 8, shape)
    small = discs([(64, 140), (140, 30), (60, 60)], 5, shape)
    rgb, truth = draw(shape, big + small)
    model = load_detector(model_path)
    instances, table = detect_with_model(rgb, model, MODEL_PARAMS)
    tp, fp, fn, pairs = match_instances(truth, instances, 0.9)
    assert (tp, fp, fn) == (8, 0, 0)
    classes = dict(zip(table["instance_id"], table["class"]))
    assert sorted(classes[p] for t, p, _ in pairs if t <= 5) == ["tumor"] * 5
    assert sorted(classes[p] for t, p, _ in pairs if t > 5) == ["immune"] * 3
    assert table["score"].between(0.5, 1.0).all() and list(table.columns) == list(TABLE_COLUMNS)
    # through the dispatcher and the resolution handling: same nuclei on a grid half the size
    halved, halved_table = segment_patch(rgb, 0.25, (75, 100), MODEL_PARAMS, model)
    assert halved.max() == 8 and sorted(halved_table["class"]) == sorted(table["class"])


def test_each_detector_reads_only_its_own_settings(model_path):
    """detector_settings is what nuclei_masks' params hold: a setting it leaves out must not be
    read, or a change to it would not rerun the rule (a plain dict raises KeyError on it)."""
    rgb, truth = draw((128, 128), discs(FIELD, 8, (128, 128)))
    classical = detector_settings(section_defaults("nuclei", {"mpp": 0.25}))
    assert classical["model"] is None and "smoothing_um" in classical
    assert not {"model_mpp", "model_classes", "tile", "pad", "train"} & set(classical)
    instances, _ = segment_patch(rgb, 0.25, (128, 128), classical)
    assert match_instances(truth, instances)[0] == len(FIELD)
    learned = detector_settings(MODEL_PARAMS | {"model": str(model_path)})
    assert set(learned) == {"model", "model_mpp", "model_classes", "tile", "pad"}
    instances, table = segment_patch(rgb, 0.25, (128, 128), learned, load_detector(model_path))
    assert match_instances(truth, instances)[0] == len(FIELD) and set(table["class"]) == {"tumor"}


def test_unmapped_model_classes_are_listed(model_path):
    rgb, _ = draw((64, 64), discs([(20, 20)], 8, (64, 64)) + discs([(45, 45)], 5, (64, 64)))
    params = section_defaults("nuclei", {"model_classes": {"lymph": "immune"}, "tile": 64, "pad": 0})
    with pytest.raises(NucleiError, match=r"classes \['big_cell'\] are not mapped; add them to nuclei.model_classes"):
        detect_with_model(rgb, load_detector(model_path), params)


def test_model_file_errors(tmp_path):
    with pytest.raises(NucleiError, match="missing.pt: no such nuclei model file"):
        load_detector(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(NucleiError, match="junk.pt: not a TorchScript module"):
        load_detector(tmp_path / "junk.pt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "state_dict.pt")
    with pytest.raises(NucleiError, match="state_dict.pt: not a TorchScript module"):
        load_detector(tmp_path / "state_dict.pt")
    with pytest.raises(ConfigError, match="nuclei.model_classes.lymph: 'lymphocyte' is not one of"):
        section_defaults("nuclei", {"model_classes": {"lymph": "lymphocyte"}})


class OneClassTooFew(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        return (x[0, 0] < 0.5).long() * 2, ["tumor"], torch.ones(1)


def test_model_breaking_the_contract(tmp_path):
    with pytest.warns(FutureWarning):
        torch.jit.script(OneClassTooFew()).save(str(tmp_path / "bad.pt"))
    rgb, _ = draw((32, 32), discs([(16, 16)], 8, (32, 32)))
    # a 32 px tile with 16 px of context, rounded up to 32: the model sees 96 x 96
    with pytest.raises(NucleiError, match="bad.pt: output instances of shape \\(96, 96\\) with ids up to 2, 1 classes"):
        detect_with_model(rgb, load_detector(tmp_path / "bad.pt"), section_defaults("nuclei", {"tile": 32, "pad": 16}))


# --- GeoJSON -----------------------------------------------------------------------------------


def test_geojson_round_trip():
    shape = (40, 48)
    instances = np.zeros(shape, np.uint16)
    instances[disk((10, 10), 6, shape=shape)] = 1
    instances[ellipse(28, 30, 5, 12, shape=shape, rotation=0.5)] = 2
    instances[disk((10, 24), 7, shape=shape)] = 3  # touches nucleus 1
    instances[8:12, 22:26] = 0  # a hole
    instances[0:3, 40:48] = 4  # on the border
    table = pd.DataFrame(
        {
            "instance_id": [1, 2, 3, 4],
            "class": ["immune", "stromal", "tumor", "other"],
            "score": 1.0,
            "hematoxylin": 0.1,
            "area": 1.0,
            "perimeter": 1.0,
            "eccentricity": 0.0,
            "solidity": 1.0,
        }
    )
    rows, cols = np.indices(shape)
    for column, values in (("bbox_y0", rows), ("bbox_x0", cols)):
        table[column] = [values[instances == i].min() for i in table["instance_id"]]
    for column, values in (("bbox_y1", rows), ("bbox_x1", cols)):
        table[column] = [values[instances == i].max() + 1 for i in table["instance_id"]]
    x, y, scale = 1000.0, 2000.0, 2.0  # mask pixel (r, c) covers level-0 [x + 2c, x + 2c + 2)
    collection = nuclei_geojson(nucleus_features(instances, table, x, y, scale, mpp=0.5))
    collection = json.loads(json.dumps(collection))  # as written to disk
    feature = collection["features"][0]
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["classification"]["name"] == "immune"
    assert "Area µm^2" in feature["properties"]["measurements"]
    assert min(p[0] for p in feature["geometry"]["coordinates"][0]) > x  # level-0 coordinates
    back, classes = NucleusRasterizer(collection).rasterize(x, y, shape[1] * scale, shape[0] * scale, shape)
    assert classes == ["immune", "stromal", "tumor", "other"]
    for i in range(1, 5):
        assert 2 * ((back == i) & (instances == i)).sum() / ((back == i).sum() + (instances == i).sum()) >= 0.95
        assert np.abs(np.argwhere(back == i).mean(0) - np.argwhere(instances == i).mean(0)).max() <= 1
    assert (back[9:11, 23:25] == 0).all()  # the hole survives
    # a window at another resolution and offset sees the same nuclei
    coarse, _ = NucleusRasterizer(collection["features"]).rasterize(x + 20, y, 48 * scale, 40 * scale, (20, 24))
    assert set(np.unique(coarse)) - {0} == {1, 2, 3, 4}


# --- slides and folders ------------------------------------------------------------------------


def test_segment_slide_patches(tmp_path):
    slide_shape = (256, 384)  # no nuclei right of column 256
    centres = [(40, 40), (40, 100), (90, 64), (120, 120), (150, 40), (200, 200), (210, 90)]
    rgb, truth = draw(slide_shape, discs(centres, 8, slide_shape))
    slide = write_tiled_tiff(tmp_path / "nuclei.tiff", rgb, mpp=0.25, levels=1, tile=128)
    # 64 px patches at 0.5 mpp (128 level-0 px), stride 64 level-0 px: every nucleus is in 1 to 4
    # patches; the patch at x=256 holds none
    origins = [(x, y) for y in (0, 64, 128) for x in (0, 64, 128)] + [(256, 0)]
    index = pd.DataFrame(
        {
            "patch_id": [f"s_x{x}_y{y}" for x, y in origins],
            "x": [x for x, _ in origins],
            "y": [y for _, y in origins],
            "size": 64,
            "mpp": 0.5,
            "slide_mpp": 0.25,
        }
    )
    params = section_defaults("nuclei", {"mpp": 0.25})
    table, collection = segment_slide_patches(index, slide, tmp_path / "nuclei", params, progress=False)
    masks = {p: read_instances(tmp_path / "nuclei" / f"{p}.png") for p in index["patch_id"]}
    assert all(m.shape == (64, 64) and m.dtype == np.uint16 for m in masks.values())
    assert set(table.columns) >= {"patch_id", "slide_x", "slide_y", "primary", *TABLE_COLUMNS}
    for patch_id, rows in table.groupby("patch_id"):
        assert set(rows["instance_id"]) == set(np.unique(masks[patch_id])) - {0}
    assert not masks["s_x256_y0"].any() and "s_x256_y0" not in set(table["patch_id"])
    primary = table[table["primary"]]
    assert len(primary) == len(collection["features"]) == len(centres)  # each nucleus once in the slide GeoJSON
    found = sorted(zip(primary["slide_y"].round(-1), primary["slide_x"].round(-1)))
    assert found == sorted((float(round(r, -1)), float(round(c, -1))) for r, c in centres)
    painted, _ = NucleusRasterizer(collection).rasterize(0, 0, 384, 256, slide_shape)
    assert score_instances([(truth, painted)])["f1"] == 1.0
    assert not list(tmp_path.glob(".*partial*"))
    # on 3 processes: the same masks byte for byte, the same table and GeoJSON
    forked, forked_collection = segment_slide_patches(
        index, slide, tmp_path / "forked", params, progress=False, workers=3
    )
    pd.testing.assert_frame_equal(forked, table)
    assert forked_collection == collection
    for patch_id in index["patch_id"]:
        assert (tmp_path / "forked" / f"{patch_id}.png").read_bytes() == (
            tmp_path / "nuclei" / f"{patch_id}.png"
        ).read_bytes()


def test_segment_images(tmp_path):
    rgb, truth = draw((128, 128), discs(FIELD, 8, (128, 128)))
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(draw((64, 64), [])[0]).save(tmp_path / "b.tif")
    paths = [tmp_path / "a.png", tmp_path / "b.tif"]
    table = segment_images(paths, 0.25, tmp_path / "out", section_defaults("nuclei", {"mpp": 0.25}), progress=False)
    assert score_instances([(truth, read_instances(tmp_path / "out" / "a.png"))])["f1"] >= 0.9
    assert not read_instances(tmp_path / "out" / "b.png").any()
    assert set(table["image"]) == {"a"} and len(table) == read_instances(tmp_path / "out" / "a.png").max()
    with pytest.raises(NucleiError, match=r"repeated: \['a'\]"):
        segment_images(
            [tmp_path / "a.png", tmp_path / "x" / "a.tif"], 0.25, tmp_path / "out2", section_defaults("nuclei")
        )


def test_nuclei_annotations_in_every_format_paint_the_same_instances(tmp_path):
    """An instance mask at a downsample, MoNuSeg XML, ASAP XML and GeoJSON of the same nuclei:
    read_nuclei gives polygons that NucleusRasterizer paints back into the same instances."""
    from histosynth.nuclei.annotations import read_annotation, read_nuclei

    small = np.zeros((12, 16), np.uint16)
    small[disk((4, 4), 3, shape=small.shape)] = 1
    small[2:6, 9:14] = 2
    small[8:11, 3:12] = 3
    Image.fromarray(small).save(tmp_path / "mask.png")
    features = read_nuclei(tmp_path / "mask.png", mask_downsample=2)
    assert len(features) == 3 and all("classification" not in f["properties"] for f in features)
    # against its slide (32 x 24 px): covered at downsample 2; at 1 an error saying which it looks like
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "slide.png")
    assert len(read_nuclei(tmp_path / "mask.png", mask_downsample=2, slide=tmp_path / "slide.png")) == 3
    with pytest.raises(NucleiError, match=r"mask\.png: the mask is 16x12 px but its image is 32x24 px .* downsample 2"):
        read_nuclei(tmp_path / "mask.png", mask_downsample=1, slide=tmp_path / "slide.png")
    painted, names = NucleusRasterizer(features).rasterize(0, 0, 32, 24, (12, 16))
    np.testing.assert_array_equal(painted, small)
    assert names == ["other"] * 3

    squares = [(2.0, 2.0, 10.0, 8.0), (12.0, 4.0, 20.0, 14.0)]
    regions = "".join(
        f'<Region Id="{k}" Type="0"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        + "</Vertices></Region>"
        for k, (x0, y0, x1, y1) in enumerate(squares, start=1)
    )
    (tmp_path / "monuseg.xml").write_text(
        f'<Annotations><Annotation Id="1" Name=""><Regions>{regions}</Regions></Annotation></Annotations>'
    )
    coords = "".join(
        f'<Annotation Name="n{k}" Type="Polygon" PartOfGroup="tumor"><Coordinates>'
        + "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>'
            for i, (x, y) in enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        )
        + "</Coordinates></Annotation>"
        for k, (x0, y0, x1, y1) in enumerate(squares)
    )
    (tmp_path / "asap.xml").write_text(
        f"<ASAP_Annotations><Annotations>{coords}</Annotations><AnnotationGroups>"
        '<Group Name="tumor"/></AnnotationGroups></ASAP_Annotations>'
    )
    (tmp_path / "nuclei.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                        },
                        "properties": {"classification": {"name": "tumor"}},
                    }
                    for x0, y0, x1, y1 in squares
                ],
            }
        )
    )
    expected = np.zeros((16, 24), np.int64)
    expected[2:8, 2:10], expected[4:14, 12:20] = 1, 2
    for name, classes in (
        ("monuseg.xml", ["other", "other"]),
        ("asap.xml", ["tumor", "tumor"]),
        ("nuclei.geojson", ["tumor", "tumor"]),
    ):
        painted, names = NucleusRasterizer(read_nuclei(tmp_path / name)).rasterize(0, 0, 24, 16, (16, 24))
        np.testing.assert_array_equal(painted, expected, err_msg=name)
        assert names == classes, name
    # nuclei-score's folder reader: the GeoJSON rasterised on the image grid, the mask as it is
    np.testing.assert_array_equal(read_annotation(tmp_path / "nuclei.geojson", (16, 24)), expected)
    np.testing.assert_array_equal(read_annotation(tmp_path / "mask.png"), small)
    # ASAP nuclei left in no group (ASAP's "None") are unclassified, as GeoJSON and masks may be
    (tmp_path / "ungrouped.xml").write_text(
        (tmp_path / "asap.xml").read_text().replace('PartOfGroup="tumor"', 'PartOfGroup="None"')
    )
    painted, names = NucleusRasterizer(read_nuclei(tmp_path / "ungrouped.xml")).rasterize(0, 0, 24, 16, (16, 24))
    np.testing.assert_array_equal(painted, expected)
    assert names == ["other", "other"]
    (tmp_path / "bad.png").write_bytes(b"\xff\xd8\xff\xe0")
    with pytest.raises(NucleiError, match=r"bad.png: a JPEG image"):
        read_nuclei(tmp_path / "bad.png")


def test_nuclei_geojson_in_every_shape_and_its_errors(tmp_path):
    from histosynth.nuclei.annotations import read_nuclei

    nucleus = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
        "properties": {},
    }
    for name, data in (
        ("collection", {"type": "FeatureCollection", "features": [nucleus]}),
        ("list", [nucleus]),
        ("feature", nucleus),
    ):
        (tmp_path / f"{name}.geojson").write_text(json.dumps(data))
        assert read_nuclei(tmp_path / f"{name}.geojson") == [nucleus], name
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(NucleiError, match=r"broken.geojson: not JSON \(.* at line 1"):
        read_nuclei(tmp_path / "broken.geojson")
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(NucleiError, match="scalar.json: expected a GeoJSON FeatureCollection"):
        read_nuclei(tmp_path / "scalar.json")
    (tmp_path / "numbers.json").write_text("[1, 2]")  # JSON, but its items are no Features
    with pytest.raises(NucleiError, match=r"numbers.json: feature\[0\] is not a GeoJSON Feature"):
        read_nuclei(tmp_path / "numbers.json")
