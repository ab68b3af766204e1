import json
from pathlib import Path

import pandas as pd
import pytest

from histosynth.cli import main

from conftest import feature, square, write_geojson


def test_inspect_prints_levels_and_mpp(square_slide, capsys):
    assert main(["inspect", str(square_slide[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "generic-tiff" and info["mpp"] == pytest.approx(0.5)
    assert [level["downsample"] for level in info["levels"]] == [1.0, 4.0]
    assert info["levels"][1]["mpp"] == pytest.approx(2.0)


def test_patches_command_with_options(square_slide, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here: schema defaults
    slide, geojson = square_slide
    argv = [
        "patches",
        str(slide),
        "--annotations",
        str(geojson),
        "--out",
        "out",
        "--size",
        "32",
        "--stride",
        "32",
        "--mpp",
        "1.0",
        "--min-tissue",
        "0.5",
        "--target-class",
        "Blood vessel",
        "--min-label",
        "0.1",
        "--classes",
        "Blood vessel=7,Fat=2",
    ]
    assert main(argv) == 0
    index = pd.read_parquet(tmp_path / "out/square.parquet")
    assert len(index) == 4 and set(index.columns) >= {"frac_blood_vessel", "frac_fat", "tissue_fraction"}
    assert "4 patches" in capsys.readouterr().out


def test_unknown_class_is_reported_with_known_ones(square_slide, tmp_path, capsys):
    slide, _ = square_slide
    geojson = write_geojson(tmp_path / "odd.geojson", [feature("Necrosis", square(300, 300, 400, 400))])
    assert main(["patches", str(slide), "--annotations", str(geojson), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "odd.geojson" in err and "Necrosis" in err and "Blood vessel" in err
    assert not (tmp_path / "out").exists()


def test_invalid_geojson_names_the_file(square_slide, tmp_path, capsys):
    bad = tmp_path / "broken.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    assert main(["patches", str(square_slide[0]), "--annotations", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "broken.geojson: not JSON" in capsys.readouterr().err


def test_bad_classes_option():
    with pytest.raises(SystemExit):
        main(["patches", "x.svs", "--out", "o", "--classes", "Fat=0"])


def test_nuclei_command_on_a_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from histosynth.nuclei.instances import read_instances

    images = tmp_path / "images"
    images.mkdir()
    rgb = np.full((64, 64, 3), (214, 120, 170), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in [(16, 16), (44, 40)]:
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = (80, 40, 130)  # 12 px discs: 6 um at 0.5 mpp
    Image.fromarray(rgb).save(images / "p1.png")
    Image.fromarray(np.full((64, 64, 3), (214, 120, 170), np.uint8)).save(images / "empty.png")
    assert main(["nuclei", str(images), "--out", str(tmp_path / "out"), "--mpp", "0.5"]) == 0
    assert read_instances(tmp_path / "out/p1.png").max() == 2
    assert read_instances(tmp_path / "out/empty.png").max() == 0
    table = pd.read_parquet(tmp_path / "out/nuclei.parquet")
    assert set(table["image"]) == {"p1"} and len(table) == 2
    assert "2 nuclei in 2 images" in capsys.readouterr().out


def test_nuclei_command_needs_mpp_for_a_folder(tmp_path, capsys):
    assert main(["nuclei", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "--mpp" in capsys.readouterr().err


def test_classes_option_brings_its_own_priority_inside_the_project(square_slide, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # config/config.yaml here: priority of three classes
    slide, geojson = square_slide
    base = [
        "patches",
        str(slide),
        "--annotations",
        str(geojson),
        "--size",
        "32",
        "--stride",
        "32",
        "--mpp",
        "1.0",
        "--classes",
        "Fat=1,Blood vessel=2",
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--priority", "Blood vessel,Fat"]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--priority", "Necrosis"]) == 2
    assert "Necrosis" in capsys.readouterr().err


def _monuseg_xml(path, squares):
    """An Aperio XML file as MoNuSeg ships it: one Region of Vertices per nucleus."""
    regions = "".join(
        f'<Region Id="{i + 1}"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        + "</Vertices></Region>"
        for i, (x0, y0, x1, y1) in enumerate(squares)
    )
    path.write_text(
        f'<?xml version="1.0"?><Annotations><Annotation Id="1"><Regions>{regions}</Regions></Annotation></Annotations>'
    )


def test_nuclei_score_against_monuseg_xml(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from histosynth.nuclei.annotations import read_xml

    truth, pred, images = (tmp_path / d for d in ("truth", "pred", "images"))
    for d in (truth, pred, images):
        d.mkdir()
    # a: two 10x10 nuclei, one found exactly, one missed; b: one nucleus found as a 10x5 half
    _monuseg_xml(truth / "a.xml", [(2, 2, 12, 12), (20, 20, 30, 30)])
    _monuseg_xml(truth / "b.xml", [(0, 0, 10, 10)])
    mask = read_xml(truth / "a.xml", (40, 40))
    assert mask.max() == 2 and (mask == 1).sum() == 121  # vertices inclusive, as skimage.draw.polygon
    found = np.where(mask == 1, 7, 0).astype(np.uint16)
    Image.fromarray(found).save(pred / "a.png")
    half = np.zeros((40, 40), np.uint16)
    half[0:11, 0:5] = 3
    Image.fromarray(half).save(pred / "b.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "a.tif")

    out = tmp_path / "scores.csv"
    assert main(["nuclei-score", str(pred), str(truth), "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("image")
    assert table.loc["a", ["tp", "fp", "fn"]].tolist() == [1, 0, 1]
    assert table.loc["a", "f1"] == pytest.approx(2 / 3) and table.loc["a", "aji"] == pytest.approx(121 / 242)
    assert table.loc["a", "pq"] == pytest.approx(2 / 3)  # the match is exact: SQ 1
    assert table.loc["b", "f1"] == 0.0 and table.loc["b", "aji"] == pytest.approx(55 / 121)
    assert table.loc["mean", "aji"] == pytest.approx((0.5 + 55 / 121) / 2)
    assert table.loc["pooled", "aji"] == pytest.approx((121 + 55) / (242 + 121))
    printed = capsys.readouterr().out
    assert "mean over 2 images: F1@0.5 0.333  AJI 0.477" in printed

    # truth on both sides: XML needs its image's size, which --images gives for a
    for f in pred.iterdir():
        f.unlink()
    _monuseg_xml(pred / "a.xml", [(2, 2, 12, 12), (20, 20, 30, 30)])
    assert main(["nuclei-score", str(pred), str(truth)]) == 2
    assert "a.xml: polygons (XML or GeoJSON) on both sides" in capsys.readouterr().err
    (truth / "b.xml").unlink()
    assert main(["nuclei-score", str(pred), str(truth), "--images", str(images), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == "a" and rows[0]["aji"] == 1.0 and rows[0]["pq"] == 1.0


def test_nuclei_score_errors_name_the_file(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    (truth / "a.xml").write_text("<Annotations><Region><Vertex X='1'/>")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(pred / "a.png")
    assert main(["nuclei-score", str(pred), str(truth)]) == 2
    assert "a.xml: not readable XML" in capsys.readouterr().err
    (truth / "a.xml").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(truth / "a.png")
    assert main(["nuclei-score", str(pred), str(truth)]) == 2
    assert "a.png: an instance mask must be one channel of integer ids" in capsys.readouterr().err
    (truth / "a.png").unlink()
    Image.fromarray(np.zeros((4, 8), np.uint16)).save(truth / "a.png")
    assert main(["nuclei-score", str(pred), str(truth)]) == 2
    assert "predict at the truth's resolution" in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_output_and_nothing_is_half_written(
    square_slide, tmp_path, capsys, monkeypatch
):
    import errno

    import histosynth.data.patches as patches

    monkeypatch.chdir(tmp_path)
    written = []

    def write_png(array, path, compression="fast"):
        if len(written) == 5:  # the disk fills up at the sixth PNG
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(patches, "write_png", write_png)
    argv = ["patches", str(square_slide[0]), "--out", "out", "--size", "32", "--stride", "32", "--mpp", "1.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and line.startswith("histosynth patches: error: ")
    assert str(Path("out") / "square") in line and "No space left on device" in line and "free space" in line
    assert len(written) == 5 and not any(p.exists() for p in written)
    assert not list((tmp_path / "out").iterdir())  # no patches, no index, no partial files


def test_a_read_only_output_folder_is_one_line_naming_it(square_slide, tmp_path, capsys, monkeypatch):
    import errno

    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # a read-only file system (chmod alone does not stop root)
        if locked in Path(self).absolute().parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    argv = ["patches", str(square_slide[0]), "--out", "locked/out", "--size", "32", "--stride", "32", "--mpp", "1.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "Traceback" not in err
        and "locked/out" in err.splitlines()[-1]
        and "Read-only file system" in err
        and "write to another folder" in err
    )
    assert not list(locked.iterdir())


def test_a_missing_input_is_one_line(tmp_path, capsys):
    assert main(["nuclei-score", str(tmp_path / "absent"), str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err


def test_nuclei_train_resuming_with_other_settings_is_one_line(tmp_path, capsys):
    """The checkpoint of a first training under --out, resumed with another --holdout: the
    message says which keys differ and what to delete, as one line instead of a traceback."""
    import numpy as np
    from PIL import Image
    from skimage.draw import disk

    images, annotations = tmp_path / "images", tmp_path / "annotations"
    images.mkdir(), annotations.mkdir()
    for name, shift in (("a", 0), ("b", 9)):
        rgb = np.full((128, 128, 3), (230, 160, 200), np.uint8)
        truth = np.zeros((128, 128), np.uint16)
        for k, (r, c) in enumerate(((30, 30), (80, 90), (100, 40)), start=1):
            rr, cc = disk((r + shift, c), 6, shape=truth.shape)
            rgb[rr, cc], truth[rr, cc] = (70, 40, 130), k
        Image.fromarray(rgb).save(images / f"{name}.png")
        Image.fromarray(truth).save(annotations / f"{name}.png")
    argv = ["nuclei-train", str(images), str(annotations), "--mpp", "0.5", "--out", str(tmp_path / "m"), "--steps", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--holdout", "b"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("histosynth nuclei-train: error: checkpoint ")
    assert "data.holdout" in err and "delete" in err
