import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import feature, square, write_geojson
from histosynth.cli import main


def test_inspect_prints_levels_and_mpp(square_slide, capsys):
    assert main(["inspect", str(square_slide[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "generic-tiff" and info["mpp"] == pytest.approx(0.5)
    assert [level["downsample"] for level in info["levels"]] == [1.0, 4.0]
    assert info["levels"][1]["mpp"] == pytest.approx(2.0)


def test_patches_command_with_options(square_slide, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/config.yaml here: schema defaults
    slide, geojson = square_slide
    argv = ["patches", str(slide), "--annotations", str(geojson), "--out", "out", "--size", "32", "--stride", "32",
            "--mpp", "1.0", "--min-tissue", "0.5", "--target-class", "Blood vessel", "--min-label", "0.1",
            "--classes", "Blood vessel=7,Fat=2"]
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
    base = ["patches", str(slide), "--annotations", str(geojson), "--size", "32", "--stride", "32", "--mpp", "1.0",
            "--classes", "Fat=1,Blood vessel=2"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--priority", "Blood vessel,Fat"]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--priority", "Necrosis"]) == 2
    assert "Necrosis" in capsys.readouterr().err
