"""Image-set inputs: plain PNG/JPEG/TIFF as single-level slides, DICOM WSI, the sheet `label`
column carried into the patch index, and `histosynth sheet`. Every test writes its own tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from histosynth.cli import main
from histosynth.config import load_config, read_slide_sheet
from histosynth.data.patches import extract_slide
from histosynth.data.sheet import SheetError, build_sheet, parse_split
from histosynth.data.slides import Slide, SlideError

from conftest import GLASS, STROMA, feature, square, write_geojson, write_tiled_tiff

# A 320 x 192 px image at 0.5 mpp: four quadrants of 160 x 96 px, each a distinct colour, so a
# swapped axis, a shifted window or a wrong channel order all show.
QUADRANTS = {(0, 0): (200, 40, 40), (0, 1): (40, 180, 60), (1, 0): (50, 60, 210), (1, 1): (230, 200, 40)}
VESSEL_RED = (190, 25, 35)


def quadrant_image() -> np.ndarray:
    rgb = np.empty((192, 320, 3), np.uint8)
    for (row, col), colour in QUADRANTS.items():
        rgb[row * 96 : (row + 1) * 96, col * 160 : (col + 1) * 160] = colour
    return rgb


def write_png(path, rgb):
    Image.fromarray(rgb).save(path)
    return path


def write_jpeg(path, rgb):
    Image.fromarray(rgb).save(path, quality=95)
    return path


def write_plain_tiff(path, rgb):
    tifffile.imwrite(path, rgb, photometric="rgb")  # no tile=: strips, which OpenSlide refuses
    return path


def write_multipage_tiff(path, rgb):
    """A thumbnail page, the full image, and a second smaller page: the full one (page 1) is used."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.ascontiguousarray(rgb[::4, ::4]), photometric="rgb")
        tw.write(rgb, photometric="rgb")
        tw.write(np.ascontiguousarray(rgb[::2, ::2]), photometric="rgb")
    return path


FORMATS = {  # suffix, writer, vendor shown by describe(), tolerance against the source
    "png": (".png", write_png, "plain image (PNG)", 0),
    "jpeg": (".jpg", write_jpeg, "plain image (JPEG)", 12),
    "tiff": (".tif", write_plain_tiff, "plain TIFF", 0),
    "multipage": (".tiff", write_multipage_tiff, "plain TIFF (3 pages, page 1 used)", 0),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_plain_image_reads_as_a_single_level_slide(kind, tmp_path):
    suffix, writer, vendor, tolerance = FORMATS[kind]
    src = quadrant_image()
    path = writer(tmp_path / f"tile{suffix}", src)
    with Slide(path, mpp=0.5) as slide:
        assert slide.dimensions == (320, 192) and slide.mpp == 0.5
        info = slide.describe()
        assert info["vendor"] == vendor and info["levels"] == [
            {"level": 0, "dimensions": (320, 192), "downsample": 1.0, "mpp": 0.5}
        ]
        assert slide.level_for(1.0) == 0
        at_1um = slide.read(0, 0, 320, 192, (160, 96))  # the whole image at 1.0 mpp
        window = slide.read(160, 96, 160, 96, (80, 48))  # the bottom-right quadrant only
        rendered = slide.render(1.0)
    stored = np.asarray(Image.open(path).convert("RGB")) if kind == "jpeg" else src  # JPEG: the decoded pixels
    reference = np.asarray(Image.fromarray(stored).resize((160, 96), Image.Resampling.LANCZOS))
    assert at_1um.shape == (96, 160, 3) and rendered.shape == (96, 160, 3)
    assert (at_1um == reference).all()  # the source downsampled, pixel for pixel
    for (row, col), colour in QUADRANTS.items():  # quadrant interiors, away from resampling ringing
        inner = at_1um[row * 48 + 6 : (row + 1) * 48 - 6, col * 80 + 6 : (col + 1) * 80 - 6]
        assert np.abs(inner.astype(int) - colour).max() <= max(tolerance, 1), (row, col)
    assert np.abs(window[4:-4, 4:-4].astype(int) - QUADRANTS[(1, 1)]).max() <= max(tolerance, 1)
    assert np.abs(rendered.astype(int) - at_1um).max() <= max(tolerance, 2)


@pytest.mark.parametrize("kind", FORMATS)
def test_plain_image_without_mpp_is_refused(kind, tmp_path):
    suffix, writer, _, _ = FORMATS[kind]
    path = writer(tmp_path / f"nompp{suffix}", quadrant_image())
    with pytest.raises(SlideError, match=rf"nompp\{suffix}.*mpp column.*--slide-mpp"):
        Slide(path, fallback_mpp=0.5)  # fallback_mpp is for slide formats only


def test_plain_tiff_grey_16_bit_planar_and_alpha(tmp_path):
    grey16 = np.arange(256, dtype=np.uint16)[None, :].repeat(8, 0) * 257  # 0..65535 across the columns
    tifffile.imwrite(tmp_path / "grey16.tif", grey16)
    with Slide(tmp_path / "grey16.tif", mpp=1.0) as slide:
        grey = slide.read(0, 0, 256, 8, (256, 8))
    assert grey.shape == (8, 256, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert np.abs(grey[4].astype(int)[:, 0] - np.arange(256)).max() <= 1  # x 255/65535: 65535 -> 255

    src = quadrant_image()
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(src, -1, 0), photometric="rgb", planarconfig="separate")
    with Slide(tmp_path / "planar.tif", mpp=0.5) as slide:
        assert (slide.read(0, 0, 320, 192, (320, 192)) == src).all()

    rgba = np.dstack([src, np.full(src.shape[:2], 255, np.uint8)])
    rgba[:, :40, 3] = 0  # a transparent (unscanned) margin
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with Slide(tmp_path / "alpha.png", mpp=0.5) as slide:
        pixels = slide.read(0, 0, 320, 192, (320, 192))
    assert (pixels[:, :40] == 255).all() and (pixels[:, 40:] == src[:, 40:]).all()


def test_files_that_are_no_image_or_are_cut_short(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(SlideError, match=r"notes\.txt: not a slide format OpenSlide reads .* nor a plain image"):
        Slide(notes, mpp=0.5)
    data = write_png(
        tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)
    ).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"cut\.png: a PNG image Pillow cannot decode.*truncated"):
        Slide(cut, mpp=0.5)


# --- patches from a plain image, with annotations and the sheet label --------------------------


def disk_polygon(cx, cy, r, n=96) -> dict:
    ring = [[cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)] for k in range(n)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


@pytest.fixture
def vessel_png(tmp_path) -> tuple[Path, Path]:
    """512 px PNG (0.5 mpp): stroma square [128, 384)^2 with a red disk (centre 256, radius 80),
    annotated as 'Blood vessel' by a 96-gon."""
    rgb = np.full((512, 512, 3), GLASS, np.uint8)
    rgb[128:384, 128:384] = STROMA
    yy, xx = np.mgrid[:512, :512]
    rgb[(yy + 0.5 - 256) ** 2 + (xx + 0.5 - 256) ** 2 <= 80**2] = VESSEL_RED
    image = write_png(tmp_path / "vessel.png", rgb)
    geojson = write_geojson(tmp_path / "vessel.geojson", [feature("Blood vessel", disk_polygon(256, 256, 80))])
    return image, geojson


@pytest.fixture
def config():
    config = load_config()
    config["patches"].update(size=32, stride=32, mpp=1.0)  # 64 px windows at level 0
    config["patches"]["tissue"]["mpp"] = 2.0
    return config


def test_extract_slide_on_a_png_labels_masks_and_the_index(vessel_png, config, tmp_path):
    image, geojson = vessel_png
    out = tmp_path / "out"
    index_path = extract_slide(
        image,
        geojson,
        out / "v",
        out / "v.parquet",
        slide_name="v",
        split="train",
        config=config,
        classes={"Blood vessel": 1},
        mpp=0.5,
        label="grade_2",
        progress=False,
    )
    index = pd.read_parquet(index_path)
    assert len(index) == 16  # the stroma square: 4 x 4 windows of 64 level-0 px
    assert index["x"].between(128, 320).all() and index["y"].between(128, 320).all()
    assert (index["label"] == "grade_2").all() and (index["slide_mpp"] == 0.5).all()
    assert pq.read_schema(index_path).field("label").type == "string"
    red_total = agree = 0
    for row in index.itertuples():
        mask = np.asarray(Image.open(out / row.mask))
        rgb = np.asarray(Image.open(out / row.image)).astype(int)
        red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80)
        red_total += red.sum()
        agree += ((mask == 1) == red).sum()
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask == 1).mean() == pytest.approx(row.frac_blood_vessel)
    assert red_total > 0.9 * math.pi * 40**2  # the disk (radius 40 px at 1 mpp) is in the patches
    assert agree / (len(index) * 32 * 32) > 0.98  # mask value 1 exactly where the image is red, up to the edge
    frac = index.set_index(["x", "y"])["frac_blood_vessel"]
    assert all(frac[xy] > 0.95 for xy in [(192, 192), (192, 256), (256, 192), (256, 256)])  # around the centre
    assert frac[(128, 128)] == 0 and frac[(320, 320)] == 0  # corners: 90 px from the centre, outside the disk


def test_extract_slide_without_label_or_mpp(vessel_png, config, tmp_path):
    image, geojson = vessel_png
    index_path = extract_slide(
        image,
        None,
        tmp_path / "n",
        tmp_path / "n.parquet",
        slide_name="n",
        split="val",
        config=config,
        mpp=0.5,
        progress=False,
    )
    assert pd.read_parquet(index_path)["label"].isna().all()
    assert pq.read_schema(index_path).field("label").type == "string"  # typed, so indexes concatenate
    with pytest.raises(SlideError, match=r"vessel\.png.*mpp column"):
        extract_slide(
            image,
            geojson,
            tmp_path / "m",
            tmp_path / "m.parquet",
            slide_name="m",
            split="val",
            config=config,
            progress=False,
        )
    assert not (tmp_path / "m.parquet").exists()


# --- DICOM WSI -----------------------------------------------------------------------------------


def square_pattern() -> np.ndarray:
    """1024 px: glass, stroma square [256, 768)^2, a red block (blood) [320, 448)^2 inside it."""
    rgb = np.full((1024, 1024, 3), GLASS, np.uint8)
    rgb[256:768, 256:768] = STROMA
    rgb[320:448, 320:448] = VESSEL_RED
    return rgb


@pytest.fixture(scope="module")
def dicom_wsi(tmp_path_factory) -> tuple[Path, Path]:
    """A two-level DICOM WSI (a folder of .dcm files) converted by wsidicomizer from a tiled
    pyramidal TIFF at 0.5 mpp; returns (DICOM folder, source TIFF)."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    folder = tmp_path_factory.mktemp("dicom")
    source = write_tiled_tiff(folder / "source.tiff", square_pattern(), mpp=0.5, levels=2, tile=256)
    files = wsidicomizer.WsiDicomizer.convert(
        source, folder / "wsi", tile_size=256, include_label=False, include_overview=False, include_thumbnail=False
    )
    assert len(files) == 2
    return folder / "wsi", source


def test_openslide_reads_the_dicom_wsi(dicom_wsi):
    folder, source = dicom_wsi
    files = sorted(folder.glob("*.dcm"))
    for path in [folder, *files]:  # the folder or any of its instances opens the whole pyramid
        with Slide(path) as slide:
            info = slide.describe()
            assert info["vendor"] == "dicom" and slide.mpp == pytest.approx(0.5)
            assert [level["dimensions"] for level in info["levels"]] == [(1024, 1024), (256, 256)]
            assert slide.level_for(2.0) == 1
            pixels = slide.read(0, 0, 1024, 1024, (512, 512))
            coarse = slide.read(0, 0, 1024, 1024, (128, 128))
    with Slide(source) as tiff:
        expected = tiff.read(0, 0, 1024, 1024, (512, 512))
    # the same JPEG tiles, passed through; decoders differ by a few levels only at colour edges on tile borders
    diff = np.abs(pixels.astype(int) - expected)
    assert diff.mean() < 0.05 and (diff > 2).mean() < 0.01 and diff.max() <= 16
    src = square_pattern()[::2, ::2]
    for y0, y1, x0, x1 in [(170, 210, 170, 210), (240, 360, 240, 360), (10, 100, 10, 100)]:  # red, stroma, glass
        assert np.abs(pixels[y0:y1, x0:x1].astype(int) - src[y0:y1, x0:x1]).max() <= 10
    assert np.abs(coarse[80:90, 80:90].astype(int) - STROMA).max() <= 10


def write_dicom(path: Path, sop_class: str, image_type: list[str] | None) -> Path:
    """A single-frame DICOM written with pydicom: no WSI converter's attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "SM", 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if image_type:
        ds.ImageType = image_type
    ds.PixelData = np.zeros((64, 64, 3), np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_malformed_dicom_names_the_missing_attributes(tmp_path):
    bad = write_dicom(tmp_path / "bad.dcm", "1.2.840.10008.5.1.4.1.1.77.1.6", None)
    with pytest.raises(SlideError) as caught:
        Slide(bad)
    message = str(caught.value)
    assert "bad.dcm" in message and "ImageType" in message and "TotalPixelMatrixColumns" in message
    assert "wsidicomizer" in message  # the fix
    ct = write_dicom(tmp_path / "ct.dcm", "1.2.840.10008.5.1.4.1.1.2", ["ORIGINAL", "PRIMARY", "AXIAL"])
    with pytest.raises(SlideError, match=r"ct\.dcm.*1\.2\.840\.10008\.5\.1\.4\.1\.1\.2 .*not VL Whole Slide"):
        Slide(ct)


# --- histosynth sheet ------------------------------------------------------------------------------


def tiny_png(path: Path, value: int = 120) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path, monkeypatch) -> Path:
    """data/<class>/tile_<i>.png: 3 classes x 5 images, the same file names in every class."""
    monkeypatch.chdir(tmp_path)
    for label in ("grade 1", "grade2", "grade3"):
        for i in range(5):
            tiny_png(tmp_path / "data" / label / f"tile_{i}.png")
    return Path("data")


def test_sheet_from_an_image_folder(image_folder, tmp_path, capsys):
    assert (
        main(
            [
                "sheet",
                str(image_folder),
                "--mpp",
                "0.25",
                "--split",
                "train=0.6,val=0.2,test=0.2",
                "--seed",
                "0",
                "--out",
                "sheet.tsv",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out
    sheet = read_slide_sheet(tmp_path / "sheet.tsv")  # validates against the schema
    assert list(sheet.columns) == [
        "slide",
        "image",
        "annotations",
        "split",
        "mpp",
        "label",
        "nuclei",
    ]  # nuclei: filled, empty
    assert len(sheet) == 15 and sheet["slide"].is_unique
    assert set(sheet["mpp"]) == {"0.25"} and set(sheet["annotations"]) == {""}
    # the same names in every class: prefixed with the (sanitised) class
    assert set(sheet.loc[sheet["label"] == "grade 1", "slide"]) == {f"grade_1_tile_{i}" for i in range(5)}
    for row in sheet.itertuples():
        assert Path(row.image).is_file() and Path(row.image).parent.name == row.label  # relative to the cwd
        assert row.image == f"data/{row.label}/tile_{row.slide[-1]}.png"
    counts = sheet.groupby(["label", "split"]).size().unstack()
    assert (counts[["train", "val", "test"]] == [3, 1, 1]).all().all()  # stratified: 60/20/20 of each class
    assert "15 images, 3 labels" in summary and "grade 1" in summary
    assert summary.splitlines()[-1].split() == ["total", "9", "3", "3", "15"]
    # deterministic given the seed, different for another seed
    assert main(["sheet", str(image_folder), "--mpp", "0.25", "--seed", "0", "--out", "again.tsv"]) == 0
    assert (tmp_path / "again.tsv").read_text() == (tmp_path / "sheet.tsv").read_text()
    assert main(["sheet", str(image_folder), "--mpp", "0.25", "--seed", "1", "--out", "other.tsv"]) == 0
    other = read_slide_sheet(tmp_path / "other.tsv")
    assert (other["split"] != sheet["split"]).any()
    assert (other.groupby(["label", "split"]).size() == sheet.groupby(["label", "split"]).size()).all()


def test_sheet_from_a_flat_folder_to_stdout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for i in range(6):
        tiny_png(tmp_path / "flat" / f"img {i}.png")
    (tmp_path / "flat" / "notes.txt").write_text("ignored")
    assert main(["sheet", "flat", "--mpp", "0.5", "--absolute"]) == 0
    captured = capsys.readouterr()
    (tmp_path / "flat.tsv").write_text(captured.out)
    sheet = read_slide_sheet(tmp_path / "flat.tsv")
    assert sorted(sheet["slide"]) == [f"img_{i}" for i in range(6)]
    assert set(sheet["label"]) == {""} and sheet["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in sheet["image"])
    assert "6 images, no labels" in captured.err and "(no label)" in captured.err


def test_sheet_groups_and_annotations(tmp_path):
    for patient in range(5):
        for frame in range(3):
            tiny_png(tmp_path / "frames" / f"p{patient}_f{frame}.png")
    (tmp_path / "ann").mkdir()
    write_geojson(tmp_path / "ann" / "p0_f1.geojson", [feature("Fat", square(0, 0, 4, 4))])
    sheet = build_sheet(
        tmp_path / "frames",
        split=parse_split("train=0.6,val=0.2,test=0.2"),
        seed=3,
        mpp=0.5,
        annotations_dir=tmp_path / "ann",
        group=r"^(p\d+)_",
        absolute=True,
    )
    patients = sheet["slide"].str.split("_").str[0]
    assert sheet.groupby(patients)["split"].nunique().eq(1).all()  # every patient in one split
    assert sheet.drop_duplicates("split").shape[0] == 3
    assert sheet.groupby("split").size().to_dict() == {"train": 9, "val": 3, "test": 3}
    with_annotations = sheet[sheet["annotations"] != ""]
    assert with_annotations["slide"].tolist() == ["p0_f1"]
    assert Path(with_annotations["annotations"].item()) == (tmp_path / "ann" / "p0_f1.geojson").resolve()


def test_sheet_errors_are_clear(tmp_path):
    split = parse_split("train=0.6,val=0.2,test=0.2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SheetError, match="empty"):
        build_sheet(tmp_path / "empty", split=split, mpp=0.5)
    (tmp_path / "text").mkdir()
    for name in ("a.txt", "b.txt", "c.csv"):
        (tmp_path / "text" / name).write_text("x")
    with pytest.raises(SheetError, match=r"no images .* holds only 1 \.csv file, 2 \.txt files"):
        build_sheet(tmp_path / "text", split=split, mpp=0.5)
    tiny_png(tmp_path / "mixed" / "loose.png")
    tiny_png(tmp_path / "mixed" / "classA" / "x.png")
    with pytest.raises(SheetError, match=r"mixed layout.*loose\.png.*classA"):
        build_sheet(tmp_path / "mixed", split=split, mpp=0.5)
    for label, n in (("common", 5), ("rare", 2)):
        for i in range(n):
            tiny_png(tmp_path / "few" / label / f"{label}{i}.png")
    with pytest.raises(SheetError, match=r"too few images .* 3 splits .*'rare': 2"):
        build_sheet(tmp_path / "few", split=split, mpp=0.5)
    with pytest.raises(SheetError, match="--mpp"):
        build_sheet(tmp_path / "few", split=parse_split("train=0.5,val=0.5"))
    with pytest.raises(SheetError, match="sum to 1"):
        parse_split("train=0.6,val=0.2")
    with pytest.raises(SystemExit):
        main(["sheet", str(tmp_path / "few"), "--split", "train=0.5,holdout=0.5"])


def test_read_slide_sheet_label_column(tmp_path):
    (tmp_path / "old.tsv").write_text("slide\timage\tsplit\na\ta.svs\ttrain\n")
    assert read_slide_sheet(tmp_path / "old.tsv")["label"].tolist() == [""]  # absent: filled, like mpp
    (tmp_path / "new.tsv").write_text(
        "slide\timage\tsplit\tmpp\tlabel\na\ta.png\ttrain\t0.5\tgrade 2\nb\tb.png\tval\t0.5\t\n"
    )
    assert read_slide_sheet(tmp_path / "new.tsv")["label"].tolist() == ["grade 2", ""]


# --- CLI on a plain TIFF tile and on a DICOM WSI ------------------------------------------------------


@pytest.fixture
def plain_tiff(tmp_path) -> Path:
    rgb = np.full((1024, 1024, 3), GLASS, np.uint8)
    rgb[256:768, 256:768] = STROMA
    return write_plain_tiff(tmp_path / "tile.tif", rgb)


def test_cli_inspect_and_patches_on_a_plain_tiff(plain_tiff, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml: schema defaults
    assert main(["inspect", str(plain_tiff)]) == 0  # described without its mpp
    out = capsys.readouterr().out
    assert (
        "vendor: plain TIFF" in out and "1024 x 1024 px" in out and "level 0: 1024 x 1024 px, downsample 1.000\n" in out
    )
    assert "mpp: unknown (give --slide-mpp or the sheet's mpp)" in out
    assert main(["inspect", str(plain_tiff), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] is None and info["levels"][0]["mpp"] is None and info["dimensions"] == [1024, 1024]
    assert main(["inspect", str(plain_tiff), "--slide-mpp", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "vendor: plain TIFF" in out and "1024 x 1024 px" in out and "mpp: 0.5000" in out and "level 1" not in out
    assert main(["inspect", str(plain_tiff), "--slide-mpp", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["levels"][0]["mpp"] == 0.5
    argv = [
        "patches",
        str(plain_tiff),
        "--out",
        "out",
        "--size",
        "32",
        "--stride",
        "32",
        "--mpp",
        "1.0",
        "--slide-mpp",
        "0.5",
        "--label",
        "G2",
    ]
    assert main(argv) == 0
    assert "64 patches" in capsys.readouterr().out
    index = pd.read_parquet(tmp_path / "out/tile.parquet")
    assert len(index) == 64 and (index["label"] == "G2").all() and (index["slide_mpp"] == 0.5).all()
    assert main(argv[:-4] + ["--name", "nompp"]) == 2  # without --slide-mpp
    assert "--slide-mpp" in capsys.readouterr().err and not (tmp_path / "out/nompp.parquet").exists()


def test_cli_inspect_and_patches_on_a_dicom_wsi(dicom_wsi, tmp_path, capsys, monkeypatch):
    folder, source = dicom_wsi
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "vendor: dicom" in out and "level 1: 256 x 256 px, downsample 4.000, 2.000 mpp" in out
    level0 = max(folder.glob("*.dcm"), key=lambda p: p.stat().st_size)
    common = ["--size", "32", "--stride", "32", "--mpp", "1.0"]
    assert main(["patches", str(level0), "--out", "out", "--name", "wsi", *common]) == 0
    assert main(["patches", str(source), "--out", "out", "--name", "tiff", *common]) == 0
    capsys.readouterr()
    dicom = pd.read_parquet(tmp_path / "out/wsi.parquet")
    tiff = pd.read_parquet(tmp_path / "out/tiff.parquet")
    assert len(dicom) == 64 and dicom["label"].isna().all() and (dicom["slide_mpp"] == 0.5).all()
    assert sorted(zip(dicom["x"], dicom["y"])) == sorted(zip(tiff["x"], tiff["y"]))  # the same windows
    first = dicom.sort_values(["y", "x"]).iloc[0]
    blood = dicom.set_index(["x", "y"]).loc[(320, 320)]  # red blood inside the tissue is tissue, not red ink
    patch = np.asarray(Image.open(tmp_path / "out" / blood["image"])).astype(int)
    assert (first["x"], first["y"]) == (256, 256) and np.abs(patch[8:24, 8:24] - VESSEL_RED).max() <= 10
