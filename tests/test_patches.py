from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histosynth.config import load_config
from histosynth.data.patches import PatchError, extract_slide, fraction_column, keep_window, window_origins

from conftest import feature, square, write_geojson, write_tiled_tiff


def write(image, annotations, out, *, slide_name, **kwargs):
    """Extract one slide as the CLI lays it out: out/<slide>/ (images/, masks/), the index
    out/<slide>.parquet and the QC thumbnail out/<slide>.qc.png; returns the index path."""
    out = Path(out)
    return extract_slide(
        image,
        annotations,
        out / slide_name,
        out / f"{slide_name}.parquet",
        out / f"{slide_name}.qc.png",
        slide_name=slide_name,
        **kwargs,
    )


def extract(*args, **kwargs) -> pd.DataFrame:
    """Run the extraction and read back the index it wrote."""
    return pd.read_parquet(write(*args, **kwargs))


@pytest.fixture
def config():
    config = load_config()
    config["patches"].update(size=32, stride=32, mpp=1.0)  # 64 level-0 px windows on a 0.5 mpp slide
    config["patches"]["tissue"]["mpp"] = 2.0  # tissue mask straight from pyramid level 1
    return config


def test_keep_window_thresholds_are_inclusive():
    assert keep_window(0.5, None, 0.5, 0.1)
    assert not keep_window(np.nextafter(0.5, 0), None, 0.5, 0.1)
    assert keep_window(0.5, 0.1, 0.5, 0.1)
    assert not keep_window(0.5, np.nextafter(0.1, 0), 0.5, 0.1)
    assert not keep_window(0.4, 1.0, 0.5, 0.1)


def test_window_origins_fit_inside_the_extent():
    assert window_origins(256, 64, 64).tolist() == [0, 64, 128, 192]
    assert window_origins(255, 64, 64).tolist() == [0, 64, 128]
    assert window_origins(256, 64, 48).tolist() == [0, 48, 96, 144, 192]
    assert window_origins(100, 10, 12.5).tolist() == [0, 12, 25, 37, 50, 62, 75, 87]
    assert window_origins(50, 64, 64).size == 0


def test_fraction_column_names():
    assert fraction_column("Blood vessel") == "frac_blood_vessel"
    assert fraction_column("Tumor_vital") == "frac_tumor_vital"


def test_extraction_keeps_tissue_windows_and_labels_them(square_slide, config, tmp_path):
    slide, geojson = square_slide
    out = tmp_path / "patches"
    index = extract(slide, geojson, out, slide_name="sq", split="val", config=config, progress=False)
    # stroma square [256, 768)^2 at 64 px windows: an 8 x 8 grid, every window all tissue
    assert len(index) == 64
    assert index["x"].between(256, 768 - 64).all() and index["y"].between(256, 768 - 64).all()
    assert (index["tissue_fraction"] == 1.0).all()
    assert set(index["split"]) == {"val"} and set(index["level"]) == {0}
    vessel = index[index["frac_blood_vessel"] > 0]
    assert sorted(zip(vessel["x"], vessel["y"])) == [(256, 256), (256, 320), (320, 256), (320, 320)]
    assert (vessel["frac_blood_vessel"] == 1.0).all()
    # the index agrees with the files it points at
    stored = pd.read_parquet(out / "sq.parquet")
    for row in stored.itertuples():
        mask = np.asarray(Image.open(out / row.mask))
        image = np.asarray(Image.open(out / row.image))
        assert mask.shape == (32, 32) and image.shape == (32, 32, 3)
        assert (mask == 1).mean() == pytest.approx(row.frac_blood_vessel)
    assert (out / "sq.qc.png").is_file()
    assert not list(out.glob(".*partial*"))


def test_min_tissue_boundary_in_extraction(square_slide, config, tmp_path):
    config["patches"]["stride"] = 16  # 32 level-0 px steps: windows straddling the edge hold exactly half tissue
    index = extract(*square_slide, tmp_path / "a", slide_name="sq", split="train", config=config, progress=False)
    assert index["tissue_fraction"].min() == 0.5
    config["patches"]["min_tissue"] = 0.51
    stricter = extract(*square_slide, tmp_path / "b", slide_name="sq", split="train", config=config, progress=False)
    assert stricter["tissue_fraction"].min() > 0.5
    assert len(stricter) == (index["tissue_fraction"] > 0.5).sum()


def test_target_class_filter(square_slide, config, tmp_path):
    config["patches"].update(target_class="Blood vessel", min_label=0.1)
    index = extract(*square_slide, tmp_path, slide_name="sq", split="train", config=config, progress=False)
    assert len(index) == 4 and (index["frac_blood_vessel"] >= 0.1).all()


def test_zero_patches_explains_which_threshold(square_slide, config, tmp_path):
    config["patches"].update(target_class="Fat", min_label=0.1)
    with pytest.raises(PatchError, match=r"0 of 256 windows kept\. 64 had tissue.*'Fat' >= patches.min_label"):
        write(*square_slide, tmp_path / "out", slide_name="sq", split="train", config=config, progress=False)
    assert not list((tmp_path / "out").iterdir())  # nothing half-written


def test_slide_without_tissue_is_an_error(tmp_path, config):
    blank = write_tiled_tiff(tmp_path / "blank.tiff", np.full((512, 512, 3), 242, np.uint8))
    with pytest.raises(PatchError, match="blank.tiff: no tissue detected"):
        write(blank, None, tmp_path / "out", slide_name="blank", split="train", config=config, progress=False)
    assert not (tmp_path / "out").exists()


def test_annotations_outside_the_slide_are_clipped(tmp_path, config, caplog):
    rgb = np.full((512, 512, 3), 242, np.uint8)
    rgb[:, 256:] = (214, 120, 170)
    slide = write_tiled_tiff(tmp_path / "edge.tiff", rgb)
    geojson = write_geojson(tmp_path / "edge.geojson", [feature("Fat", square(448, 0, 700, 512))])
    index = extract(slide, geojson, tmp_path / "out", slide_name="edge", split="train", config=config, progress=False)
    assert "clip" in caplog.text.lower()
    assert len(index) and (index["x"] + 64 <= 512).all() and (index["y"] + 64 <= 512).all()
    edge = index.loc[index["x"] == 448, "frac_fat"]
    assert len(edge) == 8 and edge.eq(1.0).all()  # the last column of windows, inside the clipped Fat region


def test_annotated_pale_regions_count_as_tissue(tmp_path, config):
    rgb = np.full((512, 512, 3), 242, np.uint8)
    rgb[:, :256] = (214, 120, 170)  # stroma on the left; the right half is pale like fat
    slide = write_tiled_tiff(tmp_path / "fat.tiff", rgb)
    geojson = write_geojson(tmp_path / "fat.geojson", [feature("Fat", square(256, 0, 384, 512))])
    index = extract(slide, geojson, tmp_path / "out", slide_name="fat", split="train", config=config, progress=False)
    fat = index[index["x"].between(256, 320)]
    assert len(fat) == 16 and (fat["tissue_fraction"] == 1.0).all() and (fat["frac_fat"] == 1.0).all()
    assert not (index["x"] >= 384).any()  # unannotated glass stays out


def test_outputs_go_where_the_caller_says(square_slide, config, tmp_path):
    """Every output path comes from the caller; image and mask columns are relative to the index's folder."""
    index_path = tmp_path / "indexes" / "sq.parquet"
    qc_path = tmp_path / "qc" / "sq.png"
    returned = extract_slide(
        *square_slide,
        tmp_path / "patches" / "sq",
        index_path,
        qc_path,
        slide_name="sq",
        split="train",
        config=config,
        progress=False,
    )
    assert returned == index_path and qc_path.is_file()
    index = pd.read_parquet(index_path)
    assert len(index) == 64 and index["image"].str.startswith("../patches/sq/").all()
    assert all((index_path.parent / path).is_file() for path in [*index["image"], *index["mask"]])
    assert sorted(p.name for p in (tmp_path / "patches" / "sq").iterdir()) == ["images", "masks"]
    # no QC thumbnail unless asked for
    extract_slide(
        *square_slide,
        tmp_path / "again",
        tmp_path / "again.parquet",
        slide_name="sq",
        split="train",
        config=config,
        progress=False,
    )
    written = sorted(
        p.name for p in tmp_path.iterdir() if p.suffix not in (".tiff", ".geojson")
    )  # not the fixture's slide
    assert written == ["again", "again.parquet", "indexes", "patches", "qc"]


@pytest.fixture
def textured_slide(tmp_path):
    """A 1024 px slide whose tissue is noisy (so every PNG's bytes are distinct) with an annotated vessel."""
    rng = np.random.default_rng(7)
    rgb = np.full((1024, 1024, 3), 240, np.uint8)
    rgb[128:896, 192:832] = rng.integers(80, 200, (768, 640, 3), dtype=np.uint8)
    slide = write_tiled_tiff(tmp_path / "textured.tiff", rgb)
    geojson = write_geojson(tmp_path / "textured.geojson", [feature("Blood vessel", square(300, 300, 500, 460))])
    return slide, geojson


def test_outputs_do_not_depend_on_the_number_of_workers(textured_slide, config, tmp_path):
    config["patches"]["stride"] = 24
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        index = extract(
            *textured_slide, out, slide_name="t", split="train", config=config, workers=workers, progress=False
        )
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "t").rglob("*.png"))}
        outputs[workers] = index, files
    (index1, files1), (index3, files3) = outputs[1], outputs[3]
    assert len(index1) > 100 and index1["frac_blood_vessel"].gt(0).any()
    pd.testing.assert_frame_equal(index1, index3)
    assert files1 == files3  # byte for byte, in the same grid order


@pytest.mark.parametrize("compression", ["deflate", "none"])
def test_png_compression_changes_bytes_not_pixels(textured_slide, config, tmp_path, compression):
    fast = extract(*textured_slide, tmp_path / "fast", slide_name="t", split="train", config=config, progress=False)
    config["patches"]["png_compression"] = compression
    other = extract(
        *textured_slide, tmp_path / compression, slide_name="t", split="train", config=config, progress=False
    )
    pd.testing.assert_frame_equal(fast, other)
    sizes = {}
    for name, root in (("fast", tmp_path / "fast"), (compression, tmp_path / compression)):
        sizes[name] = sum((root / p).stat().st_size for p in fast["image"])
    for row in fast.itertuples():
        for column in ("image", "mask"):
            a, b = tmp_path / "fast" / getattr(row, column), tmp_path / compression / getattr(row, column)
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    if compression == "none":
        assert sizes["none"] > 1.1 * sizes["fast"]  # stored, not compressed


def test_tissue_fraction_counts_every_pixel_centre():
    from histosynth.data.patches import TissueMap

    rng = np.random.default_rng(0)
    tissue = TissueMap(rng.random((40, 30)) > 0.4, scale=1 / 16)
    for x, y, extent, size in [(0, 0, 64, 32), (100.5, 37, 256, 64), (300, 500, 97.3, 48), (470, 630, 64, 32)]:
        centres = (np.arange(size) + 0.5) * (extent / size)
        rows = np.minimum(((y + centres) * tissue.scale).astype(int), 39)
        cols = np.minimum(((x + centres) * tissue.scale).astype(int), 29)
        assert tissue.fraction(x, y, extent, size) == tissue.mask[np.ix_(rows, cols)].mean()


def test_patches_command_imports_only_what_patching_needs(square_slide, tmp_path):
    import subprocess
    import sys

    slide, geojson = square_slide
    code = (
        "import sys; from histosynth.cli import main; "
        f"code = main(['patches', {str(slide)!r}, '--annotations', {str(geojson)!r}, '--out', {str(tmp_path / 'out')!r}, "
        "'--size', '32', '--stride', '32', '--mpp', '1.0']); "
        "print(sorted(m for m in ('torch', 'sqlalchemy', 'pandas', 'skimage.segmentation', 'skimage.morphology', 'timm') if m in sys.modules)); "
        "sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "square.parquet").is_file()


def test_arrow_table_matches_pyarrow_conversion():
    import pyarrow as pa

    from histosynth.data.io import arrow_table

    rows = [
        {
            "patch_id": "a_x0_y0",
            "x": 0,
            "fraction": 0.25,
            "label": None,
            "split": "tumour",
            "count": np.int64(3),
            "mixed": 1,
        },
        {
            "patch_id": "a_x1_y0",
            "x": 2**40,
            "fraction": np.float64(1 / 3),
            "label": None,
            "split": None,
            "count": None,
            "mixed": 2.5,
        },
        {
            "patch_id": "é_x2_y0",
            "x": -7,
            "fraction": None,
            "label": None,
            "split": "stroma",
            "count": np.int64(-1),
            "mixed": 0,
        },
    ]
    table = arrow_table(rows)
    assert table.schema == pa.schema(
        [
            ("patch_id", pa.string()),
            ("x", pa.int64()),
            ("fraction", pa.float64()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("count", pa.int64()),
            ("mixed", pa.float64()),
        ]
    )
    expected = [
        {**row, "count": None if row["count"] is None else int(row["count"]), "mixed": float(row["mixed"])}
        for row in rows
    ]
    assert table.to_pylist() == expected
    reference = pa.Table.from_pylist(expected, schema=table.schema)
    assert table.equals(reference)
    with pytest.raises(TypeError, match="column 'x'.*str"):
        arrow_table([{"x": 1}, {"x": "2"}])
    with pytest.raises(TypeError, match="column 'flag'.*bool"):
        arrow_table([{"flag": True}])


def test_the_qc_outline_follows_the_tissue_not_its_mask_blocks():
    from scipy import ndimage

    from histosynth.data.qc_thumbnail import _smooth_mask

    yy, xx = np.mgrid[:512, :512] + 0.5
    disc = (xx - 256) ** 2 + (yy - 256) ** 2 < 150**2
    coarse = disc.reshape(32, 16, 32, 16).mean(axis=(1, 3)) >= 0.5  # a 32 px tissue mask of it
    blocks = np.repeat(np.repeat(coarse, 16, 0), 16, 1)
    smooth = _smooth_mask(coarse, (512, 512))

    def outline(mask):  # pixels on the mask's edge: a staircase is longer than the curve it steps along
        return (mask & ~ndimage.binary_erosion(mask)).sum()

    assert outline(blocks) > 1.2 * outline(disc) and abs(outline(smooth) - outline(disc)) < 0.05 * outline(disc)
    assert (smooth != disc).sum() < (blocks != disc).sum()
