"""Tests for histosynth.data.annotations: reading QuPath GeoJSON, ASAP and Aperio XML and label masks, rasterising
them, pairing them in `histosynth sheet`, and one tiny workflow run on plain images annotated so."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, mapping

from histosynth.data.annotations import AnnotationError, Region, RegionRasterizer, class_fractions, load_regions

# A polygon with a hole and a two-part MultiPolygon, neither axis-aligned, in level-0 pixels.
HOLED = Polygon(
    [(20.3, 10.7), (180.2, 30.1), (170.6, 170.4), (30.9, 150.2)],
    [[(70.2, 60.4), (120.7, 65.3), (110.1, 110.9), (65.5, 100.2)]],
)
MULTI = MultiPolygon([shapely.Point(60.3, 60.8).buffer(40.2), shapely.Point(150.1, 140.6).buffer(30.4)])


def feature(geometry, class_name=None, **extra_properties):
    """A QuPath-style GeoJSON Feature."""
    properties = dict(extra_properties)
    if class_name is not None:
        properties["classification"] = {"name": class_name, "color": [255, 0, 0]}
    geom = mapping(geometry) if hasattr(geometry, "geom_type") else geometry
    return {"type": "Feature", "id": "f", "geometry": geom, "properties": properties}


def write(tmp_path, data, name="ann.geojson"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def rasterizer(regions, classes, **kwargs):
    kwargs.setdefault("slide_size", (1000, 1000))
    return RegionRasterizer(regions, classes, **kwargs)


# --- reading -----------------------------------------------------------------------------------


def test_collection_list_and_single_feature_parse_alike(tmp_path):
    features = [feature(HOLED, "Tumor"), feature(MULTI, "Stroma")]
    from_collection = load_regions(write(tmp_path, {"type": "FeatureCollection", "features": features}, "a.geojson"))
    from_list = load_regions(write(tmp_path, features, "b.json"))
    assert from_collection == from_list
    assert [r.class_name for r in from_list] == ["Tumor", "Stroma"]
    assert from_list[0].geometry.equals(HOLED) and from_list[1].geometry.equals(MULTI)
    assert load_regions(write(tmp_path, features[0], "c.json")) == from_list[:1]


def test_old_style_string_classification_and_other_class_keys(tmp_path):
    old = {"type": "Feature", "geometry": mapping(HOLED), "properties": {"classification": "Tumor"}}
    assert [r.class_name for r in load_regions(write(tmp_path, [old]))] == ["Tumor"]
    named = {"type": "Feature", "geometry": mapping(HOLED), "properties": {"name": "Vessel"}}
    path = write(tmp_path, [named], "named.json")
    assert [r.class_name for r in load_regions(path, {"class_key": "name"})] == ["Vessel"]
    with pytest.raises(AnnotationError, match="classification.name"):
        load_regions(path)  # properties.name is only used when class_key says so


def test_not_json_names_file_and_position(tmp_path):
    path = write(tmp_path, '{"type": "FeatureCollection",\n "features": [oops]}')
    with pytest.raises(AnnotationError) as err:
        load_regions(path)
    assert str(err.value).startswith(str(path)) and "line 2" in str(err.value)


@pytest.mark.parametrize("data", [mapping(HOLED), 42, {"type": "FeatureCollection", "features": {}}, [mapping(HOLED)]])
def test_json_that_is_not_features_names_file(tmp_path, data):
    path = write(tmp_path, data)
    with pytest.raises(AnnotationError) as err:
        load_regions(path)
    assert str(err.value).startswith(str(path)) and "Feature" in str(err.value)


def test_missing_class_names_feature_index_and_key(tmp_path):
    path = write(tmp_path, [feature(HOLED, "Tumor"), feature(MULTI)])
    with pytest.raises(AnnotationError) as err:
        load_regions(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "feature[1]" in message and "properties.classification.name" in message


def test_feature_without_geometry_or_with_bad_geometry_errors(tmp_path):
    with pytest.raises(AnnotationError, match=r"feature\[0\].*no geometry"):
        load_regions(write(tmp_path, [feature(None, "Tumor")], "a.json"))
    collection = {"type": "GeometryCollection", "geometries": [mapping(HOLED)]}
    with pytest.raises(AnnotationError, match="unsupported geometry type 'GeometryCollection'"):
        load_regions(write(tmp_path, [feature(collection, "Tumor")], "b.json"))
    malformed = {"type": "Polygon", "coordinates": [[1, 2]]}
    with pytest.raises(AnnotationError, match=r"feature\[1\].*malformed Polygon"):
        load_regions(write(tmp_path, [feature(HOLED, "Tumor"), feature(malformed, "Tumor")], "c.json"))


def test_points_lines_and_detections_are_skipped_with_a_warning(tmp_path, caplog):
    cell = feature(HOLED, "Tumor")
    cell["properties"]["objectType"] = "cell"
    features = [
        feature(shapely.Point(1, 2)),
        feature(shapely.LineString([(0, 0), (5, 5)]), "Ruler"),
        cell,
        feature(HOLED, "Tumor"),
    ]
    with caplog.at_level(logging.WARNING, logger="histosynth.data.annotations"):
        regions = load_regions(write(tmp_path, features))
    assert [r.class_name for r in regions] == ["Tumor"]
    assert "skipped 3 features (1 LineString, 1 Point, 1 cell object)" in caplog.text


def test_invalid_polygon_is_repaired_and_a_collapsed_one_rejected(tmp_path, caplog):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    with caplog.at_level(logging.WARNING, logger="histosynth.data.annotations"):
        (region,) = load_regions(write(tmp_path, [feature(bowtie, "Tumor")], "a.json"))
    assert region.geometry.is_valid and region.geometry.geom_type in ("Polygon", "MultiPolygon")
    assert region.geometry.area == pytest.approx(50.0)
    assert "repaired 1 invalid polygon" in caplog.text
    flat = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [20, 0], [0, 0]]]}
    with pytest.raises(AnnotationError, match=r"feature\[0\].*no area left"):
        load_regions(write(tmp_path, [feature(flat, "Tumor")], "b.json"))


def test_empty_file_and_empty_collection_give_no_regions(tmp_path):
    assert load_regions(write(tmp_path, "", "a.json")) == []
    assert load_regions(write(tmp_path, {"type": "FeatureCollection", "features": []}, "b.json")) == []
    assert load_regions(write(tmp_path, [], "c.json")) == []


# --- rasterising -------------------------------------------------------------------------------


def test_unknown_class_lists_known_ones():
    regions = [Region("Tumor", HOLED), Region("Tissue", MULTI), Region("Necrosis", MULTI)]
    with pytest.raises(AnnotationError) as err:
        rasterizer(regions, {"Tumor": 1, "Stroma": 2}, ignore=["Tissue"], source="slide1.geojson")
    message = str(err.value)
    assert message.startswith("slide1.geojson") and "Necrosis" in message
    for known in ("Tumor", "Stroma", "Tissue", "`classes`", "annotations.ignore_classes"):
        assert known in message
    mask = rasterizer(regions[:2], {"Tumor": 1}, ignore=["Tissue"]).rasterize(0, 0, 200, 200, (200, 200))
    assert set(np.unique(mask)) == {0, 1}  # the ignored class paints nothing


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("geometry", [HOLED, MULTI], ids=["holed", "multipolygon"])
def test_labelled_area_matches_geometry_area(geometry, downsample):
    side = 200 // downsample
    mask = rasterizer([Region("A", geometry)], {"A": 3}).rasterize(0, 0, 200, 200, (side, side))
    pixels = np.count_nonzero(mask == 3)
    assert np.count_nonzero(mask) == pixels
    # Only pixels cut by the boundary can be wrong: at most about one per pixel length of boundary.
    assert abs(pixels - geometry.area / downsample**2) <= geometry.length / downsample + 4


def test_axis_aligned_square_is_exact_and_hole_pixels_are_zero():
    square = box(10, 20, 50, 40).difference(box(20, 25, 30, 35))
    mask = rasterizer([Region("A", square)], {"A": 1}).rasterize(0, 0, 64, 64, (64, 64))
    assert np.count_nonzero(mask) == square.area
    assert not mask[25:35, 20:30].any() and mask[20:40, 10:50].sum() == square.area
    holed = rasterizer([Region("A", HOLED)], {"A": 1}).rasterize(0, 0, 200, 200, (100, 100))
    assert holed[40, 45] == 0 and holed[20, 50] == 1  # inside the hole / inside the shell, near (90, 80), (100, 40)


def test_pixels_follow_point_in_polygon_at_their_centres():
    regions = [Region("A", HOLED), Region("A", MULTI)]
    x, y, w, h, rows, cols = 13.7, -5.2, 150.3, 170.9, 37, 53
    mask = rasterizer(regions, {"A": 1}).rasterize(x, y, w, h, (rows, cols))
    cx, cy = np.meshgrid(x + (np.arange(cols) + 0.5) * w / cols, y + (np.arange(rows) + 0.5) * h / rows)
    expected = shapely.contains_xy(shapely.union_all([HOLED, MULTI]), cx, cy)
    np.testing.assert_array_equal(mask == 1, expected)


def test_adjacent_windows_tile_the_full_window():
    raster = rasterizer([Region("A", HOLED), Region("B", MULTI)], {"A": 1, "B": 2})
    full = raster.rasterize(0, 0, 200, 200, (100, 100))
    left, right = raster.rasterize(0, 0, 100, 200, (100, 50)), raster.rasterize(100, 0, 100, 200, (100, 50))
    np.testing.assert_array_equal(np.hstack([left, right]), full)


@pytest.mark.parametrize("priority, winner", [(["A", "B"], 1), (["B", "A"], 2)])
def test_priority_decides_overlaps(priority, winner):
    regions = [Region("A", box(0, 0, 60, 60)), Region("B", box(40, 40, 100, 100))]
    mask = rasterizer(regions, {"A": 1, "B": 2}, priority=priority).rasterize(0, 0, 100, 100, (100, 100))
    assert (mask[40:60, 40:60] == winner).all()
    assert (mask[:40, :40] == 1).all() and (mask[60:, 60:] == 2).all()


def test_unlisted_classes_rank_below_listed_and_by_index():
    regions = [Region(name, box(0, 0, 10, 10)) for name in ("A", "B", "C")]
    classes = {"A": 1, "B": 2, "C": 3}
    assert rasterizer(regions, classes).rasterize(0, 0, 10, 10, (4, 4))[0, 0] == 3
    assert rasterizer(regions, classes, priority=["A"]).rasterize(0, 0, 10, 10, (4, 4))[0, 0] == 1
    assert rasterizer(regions[:2], classes).rasterize(0, 0, 10, 10, (4, 4))[0, 0] == 2


def test_regions_outside_the_slide_are_clipped_or_dropped(caplog):
    regions = [
        Region("A", box(80, 10, 120, 30)),
        Region("B", box(200, 200, 220, 220)),
        Region("A", box(10, 10, 20, 20)),
    ]
    with caplog.at_level(logging.WARNING, logger="histosynth.data.annotations"):
        raster = rasterizer(regions, {"A": 1, "B": 2}, slide_size=(100, 50), source="s.geojson")
    assert "s.geojson: clipped 1 region" in caplog.text and "s.geojson: dropped 1 region" in caplog.text
    mask = raster.rasterize(60, 0, 80, 40, (40, 80))  # window reaching past the slide's right edge
    assert (mask[10:30, 20:40] == 1).all() and not mask[:, 40:].any()
    assert not raster.rasterize(190, 190, 40, 40, (8, 8)).any()


def test_window_without_regions_is_all_zero():
    mask = rasterizer([Region("A", HOLED)], {"A": 1}).rasterize(500, 500, 256, 256, (64, 64))
    assert mask.shape == (64, 64) and mask.dtype == np.uint8 and not mask.any()
    assert not rasterizer([], {"A": 1}).rasterize(0, 0, 100, 100, (10, 10)).any()


def test_class_fractions_match_counts():
    mask = rasterizer([Region("A", HOLED), Region("B", MULTI)], {"A": 1, "B": 2}).rasterize(0, 0, 200, 200, (80, 80))
    fractions = class_fractions(mask, {"A": 1, "B": 2, "C": 7})
    assert 0 < sum(fractions.values()) <= 1
    assert fractions["A"] == np.count_nonzero(mask == 1) / mask.size
    assert fractions["B"] == np.count_nonzero(mask == 2) / mask.size
    assert fractions["C"] == 0


# --- formats: ASAP XML, Aperio XML, label masks, told apart by content ----------------------------


def asap_xml(annotations, groups=("Tumor", "Stroma")):
    """An ASAP file: annotations are (type, group, [(x, y), ...])."""
    items = []
    for i, (kind, group, points) in enumerate(annotations):
        coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(points))
        items.append(
            f'<Annotation Name="Annotation {i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    group_xml = "".join(f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>' for g in groups)
    return (
        f'<?xml version="1.0"?>\n<ASAP_Annotations><Annotations>{"".join(items)}</Annotations>'
        f"<AnnotationGroups>{group_xml}</AnnotationGroups></ASAP_Annotations>"
    )


def aperio_xml(annotations):
    """An Aperio ImageScope file: annotations are (name, description, [(negative, [(x, y), ...]), ...])."""
    items = []
    for i, (name, description, regions) in enumerate(annotations, start=1):
        region_xml = "".join(
            f'<Region Id="{k}" Type="0" NegativeROA="{int(negative)}"><Attributes/><Vertices>'
            + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in points)
            + "</Vertices></Region>"
            for k, (negative, points) in enumerate(regions, start=1)
        )
        items.append(
            f'<Annotation Id="{i}" Name="{name}" LineColor="65280" Type="4"><Attributes>'
            f'<Attribute Name="Description" Id="0" Value="{description}"/></Attributes>'
            f"<Regions><RegionAttributeHeaders/>{region_xml}</Regions></Annotation>"
        )
    return f'<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.5">{"".join(items)}</Annotations>'


def square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_asap_groups_are_classes_and_rectangles_splines_are_areas_dots_skipped(tmp_path, caplog):
    path = write(
        tmp_path,
        asap_xml(
            [
                ("Polygon", "Tumor", square(2, 2, 10, 6)),
                ("Rectangle", "Stroma", square(12, 4, 16, 14)),
                ("Spline", "Tumor", [(2, 10), (8, 10), (8, 14), (2, 14)]),
                ("Dot", "Tumor", [(30, 30)]),
            ]
        ),
        "slide.xml",
    )
    with caplog.at_level(logging.INFO):
        regions = load_regions(path)
    assert "skipped 1 dot/point-set" in caplog.text
    mask = rasterizer(regions, {"Tumor": 1, "Stroma": 2}).rasterize(0, 0, 20, 16, (16, 20))
    expected = np.zeros((16, 20), np.uint8)
    expected[2:6, 2:10] = 1
    expected[10:14, 2:8] = 1
    expected[4:14, 12:16] = 2
    np.testing.assert_array_equal(mask, expected)


def test_asap_annotation_outside_the_groups_lists_them(tmp_path):
    path = write(tmp_path, asap_xml([("Polygon", "Necrosis", square(0, 0, 4, 4))]), "a.xml")
    with pytest.raises(AnnotationError, match=r"a.xml: Annotation\[0\].*'Necrosis'.*groups: 'Tumor', 'Stroma'"):
        load_regions(path)
    path = write(tmp_path, asap_xml([("Polygon", "None", square(0, 0, 4, 4))]), "b.xml")
    with pytest.raises(AnnotationError, match="assign it to a group"):
        load_regions(path)


def test_aperio_negative_region_is_a_hole_and_class_comes_from_name_or_attribute(tmp_path):
    path = write(
        tmp_path,
        aperio_xml(
            [
                ("Tumor", "tumour bed", [(False, square(0, 0, 12, 12)), (True, square(4, 4, 8, 8))]),
                ("Stroma", "stroma", [(False, square(14, 0, 18, 6)), (False, square(14, 8, 18, 12))]),
            ]
        ),
        "slide.xml",
    )
    regions = load_regions(path)
    assert [r.class_name for r in regions] == ["Tumor", "Stroma"]
    mask = rasterizer(regions, {"Tumor": 1, "Stroma": 2}).rasterize(0, 0, 20, 12, (12, 20))
    expected = np.zeros((12, 20), np.uint8)
    expected[0:12, 0:12] = 1
    expected[4:8, 4:8] = 0
    expected[0:6, 14:18] = 2
    expected[8:12, 14:18] = 2
    np.testing.assert_array_equal(mask, expected)
    by_description = load_regions(path, {"aperio_class": "Description"})
    assert [r.class_name for r in by_description] == ["tumour bed", "stroma"]
    nameless = write(tmp_path, aperio_xml([("", "", [(False, square(0, 0, 4, 4))])]), "nameless.xml")
    with pytest.raises(AnnotationError, match=r"nameless.xml: Annotation\[0\] has no class in 'Name'.*aperio_class"):
        load_regions(nameless)


def test_label_mask_at_a_downsample_paints_its_pixels_at_level_0(tmp_path):
    from PIL import Image

    small = np.zeros((5, 6), np.uint8)
    small[1:3, 1:4] = 1
    small[3, 4:6] = 2
    small[4, 0] = 7
    path = tmp_path / "slide.png"
    Image.fromarray(small).save(path)
    settings = {"mask_values": {1: "Tumor", 2: "Stroma", 7: "Tumor"}, "mask_downsample": 4}
    regions = load_regions(path, settings, slide_size=(24, 20))
    mask = rasterizer(regions, {"Tumor": 1, "Stroma": 2}).rasterize(0, 0, 24, 20, (20, 24))
    expected = np.kron(np.select([small == 2, small > 0], [2, 1], 0), np.ones((4, 4), int)).astype(np.uint8)
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(
        AnnotationError, match=r"slide.png: the mask is 6x5 px but its image is 48x40.*mask_downsample: 8"
    ):
        load_regions(path, settings, slide_size=(48, 40))
    with pytest.raises(AnnotationError, match=r"slide.png: mask values 7 have no class.*annotations.mask_values"):
        load_regions(path, {"mask_values": {1: "Tumor", 2: "Stroma"}, "mask_downsample": 4})
    with pytest.raises(AnnotationError, match="needs annotations.mask_values"):
        load_regions(path)


def test_the_same_slide_in_geojson_asap_and_aperio_gives_identical_masks(tmp_path):
    tumor = [(20.3, 10.7), (180.2, 30.1), (170.6, 170.4), (30.9, 150.2)]
    vessel = [(60.5, 40.2), (120.8, 55.9), (95.1, 130.3)]
    geo = write(tmp_path, [feature(Polygon(tumor), "Tumor"), feature(Polygon(vessel), "Vessel")], "s.geojson")
    asap = write(
        tmp_path, asap_xml([("Polygon", "Tumor", tumor), ("Polygon", "Vessel", vessel)], ("Tumor", "Vessel")), "s.asap"
    )
    aperio = write(tmp_path, aperio_xml([("Tumor", "", [(False, tumor)]), ("Vessel", "", [(False, vessel)])]), "s.xml")
    classes = {"Tumor": 1, "Vessel": 2}
    masks = [
        rasterizer(load_regions(p), classes, priority=["Vessel"]).rasterize(0, 0, 200, 200, (100, 100))
        for p in (geo, asap, aperio)
    ]
    assert set(np.unique(masks[0])) == {0, 1, 2}
    np.testing.assert_array_equal(masks[1], masks[0])
    np.testing.assert_array_equal(masks[2], masks[0])


def test_format_is_told_by_content_and_other_files_are_refused(tmp_path):
    from histosynth.data.annotations import check_sheet_files, detect_format

    assert detect_format(write(tmp_path, asap_xml([]), "wrong-suffix.json")) == "asap"
    assert detect_format(write(tmp_path, aperio_xml([]), "a.txt")) == "aperio"
    assert detect_format(write(tmp_path, [], "b.xml")) == "geojson"
    utf16 = tmp_path / "utf16.xml"
    utf16.write_text(
        aperio_xml([("Tumor", "", [(False, square(0, 0, 4, 4))])]).replace('"1.0"?>', '"1.0" encoding="UTF-16"?>'),
        encoding="utf-16",
    )
    assert detect_format(utf16) == "aperio" and [r.class_name for r in load_regions(utf16)] == ["Tumor"]
    with pytest.raises(AnnotationError, match=r"c.xml: XML with root <svg>"):
        detect_format(write(tmp_path, "<svg></svg>", "c.xml"))
    jpeg = tmp_path / "d.png"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    with pytest.raises(AnnotationError, match="d.png: a JPEG image"):
        detect_format(jpeg)
    sheet = {"slide": ["s1", "s2"], "annotations": ["", str(tmp_path / "missing.geojson")], "nuclei": ["", str(jpeg)]}
    with pytest.raises(AnnotationError, match=r"slides.tsv, slide s2, column nuclei: .*d.png: a JPEG image"):
        check_sheet_files(sheet, "slides.tsv")
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "labels.png")
    sheet = {"slide": ["s1"], "annotations": [str(tmp_path / "labels.png")], "nuclei": [""]}
    with pytest.raises(
        AnnotationError, match=r"slides.tsv, slide s1, column annotations: .*labels.png is a label mask"
    ):
        check_sheet_files(sheet, "slides.tsv")
    check_sheet_files(sheet, "slides.tsv", {1: "Tumor"})


def test_sheet_pairs_images_with_annotations_of_any_format_and_with_masks(tmp_path, capsys):
    from PIL import Image

    from histosynth.cli import main
    from histosynth.config import read_slide_sheet

    for name in ("a", "b", "c", "d", "e", "f"):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "ann").mkdir()
    write(tmp_path / "ann", asap_xml([("Polygon", "Tumor", square(0, 0, 4, 4))]), "a.xml")
    write(tmp_path / "ann", aperio_xml([("Tumor", "", [(False, square(0, 0, 4, 4))])]), "b.xml")
    write(tmp_path / "ann", [feature(box(0, 0, 4, 4), "Tumor")], "c.geojson")
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "masks" / "d.png")
    out = tmp_path / "sheet.tsv"
    assert (
        main(
            [
                "sheet",
                str(tmp_path / "images"),
                "--mpp",
                "0.5",
                "--annotations",
                str(tmp_path / "ann"),
                "--masks",
                str(tmp_path / "masks"),
                "--absolute",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sheet = read_slide_sheet(out)
    paired = {slide: Path(path).name for slide, path in zip(sheet["slide"], sheet["annotations"]) if path}
    assert paired == {"a": "a.xml", "b": "b.xml", "c": "c.geojson", "d": "d.png"}
    assert "nuclei" not in out.read_text().splitlines()[0].split("\t")  # the column only with --nuclei
    (tmp_path / "nuclei").mkdir()
    (tmp_path / "nuclei" / "e.xml").write_text(aperio_xml([("", "", [(False, square(0, 0, 4, 4))])]))
    Image.fromarray(np.eye(8, dtype=np.uint16)).save(tmp_path / "nuclei" / "f.png")
    assert (
        main(
            ["sheet", str(tmp_path / "images"), "--mpp", "0.5", "--nuclei", str(tmp_path / "nuclei"), "--out", str(out)]
        )
        == 0
    )
    sheet = read_slide_sheet(out)
    assert {s: Path(p).name for s, p in zip(sheet["slide"], sheet["nuclei"]) if p} == {"e": "e.xml", "f": "f.png"}
    # a mask in the polygon folder (or an image annotated twice) is refused, naming the file
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    assert (
        main(
            [
                "sheet",
                str(tmp_path / "images"),
                "--mpp",
                "0.5",
                "--annotations",
                str(tmp_path / "ann"),
                "--masks",
                str(tmp_path / "masks"),
            ]
        )
        == 2
    )
    assert "images/a.png: annotated twice" in capsys.readouterr().err
    (tmp_path / "masks" / "a.png").unlink()
    (tmp_path / "ann" / "e.xml").write_bytes((tmp_path / "masks" / "d.png").read_bytes())
    assert main(["sheet", str(tmp_path / "images"), "--mpp", "0.5", "--annotations", str(tmp_path / "ann")]) == 2
    assert "ann/e.xml: holds label-mask image (PNG/TIFF), but" in capsys.readouterr().err


@pytest.mark.integration
def test_tiny_workflow_on_plain_images_with_asap_aperio_and_label_mask_annotations(tmp_path):
    """One small run: three PNG slides annotated in ASAP XML (train, with nuclei as an instance
    mask), a label mask at downsample 4 (val) and Aperio XML (test), up to the real ratio's
    segmentation export and the nuclei scored against the instance mask; then a sheet naming a
    file of the wrong kind is refused before any job."""

    from PIL import Image

    from conftest import REPO, run_snakemake

    rng = np.random.default_rng(0)
    side, down = 512, 4  # level-0 px; 0.5 mpp -> 128 px at the tiny preset's 2.0 mpp: 16 patches of 32 px
    labels = np.zeros((side // down, side // down), np.uint8)  # in mask pixels (4 level-0 px each)
    labels[8:40, 8:72] = 1  # Blood vessel
    labels[72:120, 40:100] = 3  # Fat
    labels[20:60, 90:120] = 2  # Inflammation
    names = {1: "Blood vessel", 2: "Inflammation", 3: "Fat"}
    boxes = {
        v: (xs.min() * down, ys.min() * down, (xs.max() + 1) * down, (ys.max() + 1) * down)
        for v in names
        for ys, xs in [np.nonzero(labels == v)]
    }
    for slide in ("a", "b", "c"):
        pink = np.stack(
            [
                rng.integers(170, 230, (side, side)),
                rng.integers(90, 140, (side, side)),
                rng.integers(150, 200, (side, side)),
            ],
            axis=-1,
        ).astype(np.uint8)
        Image.fromarray(pink).save(tmp_path / f"{slide}.png")
    asap = asap_xml([("Rectangle", names[v], square(*boxes[v])) for v in names], tuple(names.values()))
    (tmp_path / "a.xml").write_text(asap)
    Image.fromarray(labels).save(tmp_path / "b_labels.png")
    (tmp_path / "c.xml").write_text(aperio_xml([(names[v], "", [(False, square(*boxes[v]))]) for v in names]))
    nuclei = np.zeros_like(labels, np.uint16)
    for k, (r, c) in enumerate([(20, 20), (50, 60), (90, 30), (100, 100)], start=1):
        nuclei[r - 2 : r + 2, c - 2 : c + 2] = k
    Image.fromarray(nuclei).save(tmp_path / "a_nuclei.png")
    (tmp_path / "sheet.tsv").write_text(
        "slide\timage\tannotations\tsplit\tmpp\tnuclei\n"
        "a\ta.png\ta.xml\ttrain\t0.5\ta_nuclei.png\n"
        "b\tb.png\tb_labels.png\tval\t0.5\t\n"
        "c\tc.png\tc.xml\ttest\t0.5\t\n"
    )
    (tmp_path / "overlay.yaml").write_text(
        "slides: sheet.tsv\npatches: {tissue: {otsu: false}}\n"
        "annotations: {mask_values: {1: Blood vessel, 2: Inflammation, 3: Fat}, mask_downsample: 4}\n"
    )

    def snakemake(*args):
        configs = [REPO / "config/config.yaml", REPO / "config/tiny.yaml", tmp_path / "overlay.yaml"]
        return run_snakemake(tmp_path, configs, *args)

    result = snakemake("results/export/real/segmentation", "results/nuclei/a.quality.csv")
    assert result.returncode == 0, result.stderr[-4000:]
    for slide in ("a", "b", "c"):  # every patch's mask is the label mask's pixels under it (4 level-0 px each)
        index = pd.read_parquet(tmp_path / f"results/patches/{slide}.parquet")
        assert len(index) == 16
        for row in index.itertuples():
            mask = np.asarray(Image.open(tmp_path / "results/patches" / row.mask))
            expected = labels[row.y // down : row.y // down + 32, row.x // down : row.x // down + 32]
            np.testing.assert_array_equal(mask, expected, err_msg=f"{slide} {row.patch_id}")
    export = tmp_path / "results/export/real/segmentation"
    assert json.loads((export / "dataset.json").read_text())["splits"] == {"train": 16, "val": 16, "test": 16}
    quality = pd.read_csv(tmp_path / "results/nuclei/a.quality.csv").set_index("metric")["value"]
    assert {"f1", "aji", "dice"} <= set(quality.index)

    Image.fromarray(labels).convert("RGB").save(tmp_path / "c.jpg")
    (tmp_path / "sheet.tsv").write_text((tmp_path / "sheet.tsv").read_text().replace("c.xml", "c.jpg"))
    result = snakemake("--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "sheet.tsv, slide c, column annotations: c.jpg: a JPEG image" in output
