"""Tests for histosynth.demo: procedural demo slides and their region and nuclei GeoJSON."""

import json

import numpy as np
import openslide
import pytest
import shapely
from shapely.geometry import Polygon, box, shape
from skimage.color import rgb2hsv

from histosynth.demo import generate_demo_slide
from histosynth.demo.render import Renderer
from histosynth.demo.scene import DEMO_NUCLEUS_CLASSES, DEMO_REGION_CLASSES

SIZE = 1024


def make(folder, **kwargs):
    """Generate a demo slide into `folder`; returns (tiff, regions, nuclei, summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "demo.tiff", folder / "demo.geojson", folder / "demo.nuclei.geojson"
    options = {"size": SIZE, "levels": 3, "tile_size": 256, "seed": 0, "progress": False} | kwargs
    return (*paths, generate_demo_slide(*paths, **options))


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make(tmp_path_factory.mktemp("demo"))


def regions_by_class(path):
    features = json.loads(path.read_text())["features"]
    out = {}
    for f in features:
        out.setdefault(f["properties"]["classification"]["name"], []).append(shape(f["geometry"]))
    return features, out


def nuclei_features(path):
    return json.loads(path.read_text())["features"]


def level0(tiff):
    with openslide.OpenSlide(str(tiff)) as osr:
        return np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB")).astype(float)


def rasterise(geoms, size):
    """Boolean mask of the pixels whose centres lie inside any of the geometries."""
    y, x = np.mgrid[:size, :size] + 0.5
    return shapely.contains_xy(shapely.union_all(list(geoms)), x, y)


def test_openslide_reads_the_pyramid_and_its_mpp(slide):
    tiff, *_ = slide
    with openslide.OpenSlide(str(tiff)) as osr:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert osr.level_count == 3
        assert osr.level_dimensions == ((1024, 1024), (256, 256), (64, 64))
        assert osr.level_downsamples == pytest.approx((1, 4, 16))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert osr.properties["tiff.ResolutionUnit"] == "centimeter"
        assert osr.properties["openslide.level[0].tile-width"] == "256"


def test_tissue_is_stained_and_glass_is_near_white(slide):
    tiff, regions, _, _ = slide
    _, by_class = regions_by_class(regions)
    tissue = by_class["Tissue"][0]
    assert 0.45 < tissue.area / SIZE**2 < 0.8
    rgb = level0(tiff)
    inside = rasterise([tissue], SIZE)
    outside = ~rasterise([tissue.buffer(4)], SIZE)
    glass = rgb[outside]
    assert 235 <= glass.mean() <= 245 and 0.5 < glass.std() < 4
    stroma = shapely.difference(tissue, shapely.union_all(sum((by_class[c] for c in DEMO_REGION_CLASSES[1:]), [])))
    stroma_rgb = rgb[rasterise([stroma.buffer(-4)], SIZE)]
    assert stroma_rgb.mean() < 215
    assert stroma_rgb[:, 0].mean() > stroma_rgb[:, 1].mean() + 30  # pink: red above green
    saturation = rgb2hsv(rgb.astype(np.uint8))[..., 1]
    assert np.median(saturation[inside & rasterise([stroma], SIZE)]) > 0.2
    assert np.median(saturation[outside]) < 0.05


def test_region_geojson_layout(slide):
    _, regions, _, summary = slide
    features, by_class = regions_by_class(regions)
    assert set(by_class) == set(DEMO_REGION_CLASSES)
    assert len(by_class["Tissue"]) == 1 and len(by_class["Inflammation"]) == 1
    assert 1 <= len(by_class["Fat"]) <= 2 and len(by_class["Blood vessel"]) >= 3
    assert summary["regions"] == {name: len(by_class[name]) for name in DEMO_REGION_CLASSES}
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert len(props["classification"]["color"]) == 3
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        polygons = (
            f["geometry"]["coordinates"] if f["geometry"]["type"] == "MultiPolygon" else [f["geometry"]["coordinates"]]
        )
        assert all(ring[0] == ring[-1] for poly in polygons for ring in poly)
    geoms = [shape(f["geometry"]) for f in features]
    assert all(g.is_valid for g in geoms)
    assert all(box(0, 0, SIZE, SIZE).contains(g) for g in geoms)
    tissue = by_class["Tissue"][0]
    assert all(tissue.contains(g) for g in geoms[1:])
    inflammation = by_class["Inflammation"][0]
    assert inflammation.geom_type == "MultiPolygon" and 2 <= len(inflammation.geoms) <= 4
    assert any(len(f.interiors) > 0 for f in by_class["Fat"])
    # classes other than the tissue outline do not overlap
    labelled = [g for name in DEMO_REGION_CLASSES[1:] for g in by_class[name]]
    assert sum(g.area for g in labelled) == pytest.approx(shapely.union_all(labelled).area)


def test_nuclei_geojson_layout(slide):
    _, regions, nuclei, summary = slide
    _, by_class = regions_by_class(regions)
    features = nuclei_features(nuclei)
    assert [f["properties"]["id"] for f in features] == list(range(1, len(features) + 1))
    names = [f["properties"]["classification"]["name"] for f in features]
    assert set(names) == set(DEMO_NUCLEUS_CLASSES)
    assert summary["nuclei"] == {name: names.count(name) for name in DEMO_NUCLEUS_CLASSES}
    assert all(f["properties"]["objectType"] == "detection" for f in features)
    rings = [f["geometry"]["coordinates"][0] for f in features]
    assert all(16 <= len(r) - 1 <= 24 and r[0] == r[-1] for r in rings)
    polygons = [Polygon(r) for r in rings]
    assert all(p.is_valid for p in polygons)
    tissue = by_class["Tissue"][0]
    assert all(tissue.contains(p) for p in polygons)
    lumens = shapely.union_all(by_class["Blood vessel"])
    inflammation = by_class["Inflammation"][0]
    for name, poly in zip(names, polygons):
        if name == "blood":
            assert lumens.contains(poly)
        elif name == "immune":
            assert inflammation.contains(poly)
    # varied sizes, none below what the nuclei detector keeps (8 um^2, red cells 12 um^2; 4 px^2 per um^2)
    areas = {
        name: np.array([p.area for n, p in zip(names, polygons) if n == name]) / 4 for name in DEMO_NUCLEUS_CLASSES
    }
    assert areas["stromal"].min() > 0.98 * 8 and areas["immune"].min() > 0.98 * 8 and areas["blood"].min() > 0.98 * 12
    assert 8 < areas["immune"].mean() < 15 and areas["stromal"].std() > 2
    assert areas["stromal"].max() < np.pi * 3.5**2


def test_nuclei_barely_overlap(slide):
    *_, nuclei, _ = slide
    polygons = np.array([Polygon(f["geometry"]["coordinates"][0]) for f in nuclei_features(nuclei)])
    pairs = shapely.STRtree(polygons).query(polygons, predicate="intersects")
    i, j = pairs[:, pairs[0] < pairs[1]]
    shared = shapely.area(shapely.intersection(polygons[i], polygons[j]))
    smaller = np.minimum(shapely.area(polygons[i]), shapely.area(polygons[j]))
    assert (shared / smaller).max() < 0.3


def test_drawn_pixels_match_the_nuclei_polygons(slide):
    tiff, regions, nuclei, _ = slide
    features = nuclei_features(nuclei)
    rgb = level0(tiff)
    names = [f["properties"]["classification"]["name"] for f in features]
    polygons = [Polygon(f["geometry"]["coordinates"][0]) for f in features]
    stained = rasterise([p for n, p in zip(names, polygons) if n != "blood"], SIZE)
    red = rasterise([p for n, p in zip(names, polygons) if n == "blood"], SIZE)
    dark = rgb[..., 0] < 150  # haematoxylin: red channel strongly absorbed
    assert (dark & stained).sum() / (dark | stained).sum() > 0.9
    # darker than the stroma right around them
    _, by_class = regions_by_class(regions)
    stroma_ring = rasterise([p.buffer(4) for n, p in zip(names, polygons) if n == "stromal"], SIZE) & ~stained
    assert rgb[stained].mean() < rgb[stroma_ring].mean() - 50
    # red blood cells: red, not purple
    cells = rgb[red]
    assert cells[:, 0].mean() > cells[:, 1].mean() + 60 and cells[:, 0].mean() > cells[:, 2].mean() + 40


def test_coarser_levels_render_the_same_scene(slide):
    tiff, *_ = slide
    full = level0(tiff)
    with openslide.OpenSlide(str(tiff)) as osr:
        level1 = np.asarray(osr.read_region((0, 0), 1, (256, 256)).convert("RGB")).astype(float)
    pooled = full.reshape(256, 4, 256, 4, 3).mean((1, 3))
    assert np.abs(level1 - pooled).mean() < 8
    assert np.abs(level1.mean((0, 1)) - pooled.mean((0, 1))).max() < 4


def test_same_seed_same_bytes_other_seed_differs(slide, tmp_path):
    again = make(tmp_path / "again")
    other = make(tmp_path / "other", seed=1)
    for first, second, third in zip(slide[:3], again[:3], other[:3]):
        assert first.read_bytes() == second.read_bytes()
        assert first.read_bytes() != third.read_bytes()
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "demo.geojson",
        "demo.nuclei.geojson",
        "demo.tiff",
    ]


def test_physical_sizes_follow_mpp_and_progress_names_the_file(tmp_path, capsys):
    tiff, _, nuclei, summary = make(tmp_path, size=512, levels=2, mpp=0.25, progress=True)
    assert "demo.tiff level 0" in capsys.readouterr().err
    with openslide.OpenSlide(str(tiff)) as osr:
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert osr.level_dimensions == ((512, 512), (128, 128))
    assert summary["size"] == 512 and summary["levels"] == 2
    areas = [
        Polygon(f["geometry"]["coordinates"][0]).area
        for f in nuclei_features(nuclei)
        if f["properties"]["classification"]["name"] == "immune"
    ]
    assert 8 * 16 < np.mean(areas) < 15 * 16  # as many um^2 as at 0.5 mpp, at 16 px^2 per um^2


def test_a_failure_leaves_no_files(tmp_path, monkeypatch):
    calls = []
    real_tile = Renderer.tile

    def failing_tile(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_tile(self, *args)

    monkeypatch.setattr(Renderer, "tile", failing_tile)
    with pytest.raises(RuntimeError, match="disk full"):
        make(tmp_path / "out", size=512, levels=1)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("bad", [{"tile_size": 100}, {"levels": 0}, {"mpp": 0}, {"size": 100}])
def test_bad_parameters_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        make(tmp_path, **bad)
