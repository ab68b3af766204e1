"""Integration: the workflow on the tiny preset, in a temporary directory, through the snakemake CLI."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.integration


def snakemake(workdir, *args):
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(REPO / "config/config.yaml"), str(REPO / "config/tiny.yaml"),
        "--cores", "2", "--resources", "gpu=1", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_patches_for_every_slide_with_its_split(tiny_run):
    sheet = pd.read_csv(REPO / "config/slides.tiny.tsv", sep="\t")
    for slide, split in zip(sheet["slide"], sheet["split"]):
        index = pd.read_parquet(tiny_run / f"results/patches/{slide}.parquet")
        assert len(index) > 20
        assert set(index["split"]) == {split}
        assert (index["tissue_fraction"] >= 0.5).all()
        assert (tiny_run / f"results/patches/{slide}.qc.png").is_file()
        for row in index.sample(5, random_state=0).itertuples():
            image = np.asarray(Image.open(tiny_run / "results/patches" / row.image))
            mask = np.asarray(Image.open(tiny_run / "results/patches" / row.mask))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            assert (mask == 1).mean() == pytest.approx(row.frac_blood_vessel)


def test_every_label_class_appears_somewhere(tiny_run):
    index = pd.concat(pd.read_parquet(p) for p in (tiny_run / "results/patches").glob("*.parquet"))
    for column in ("frac_blood_vessel", "frac_inflammation", "frac_fat"):
        assert index[column].max() > 0.5, column


def test_nuclei_and_conditioning_maps(tiny_run):
    import json

    from histosynth.conditioning import read_conditioning
    from histosynth.nuclei import read_instances

    patches = pd.read_parquet(tiny_run / "results/patches/tiny_a.parquet")
    nuclei = pd.read_parquet(tiny_run / "results/nuclei/tiny_a.parquet")
    assert set(nuclei["patch_id"]) <= set(patches["patch_id"]) and len(nuclei) > 100
    for patch_id in patches["patch_id"][:5]:
        assert read_instances(tiny_run / f"results/nuclei/tiny_a/{patch_id}.png").shape == (32, 32)
    geojson = json.loads((tiny_run / "results/nuclei/tiny_a.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and len(geojson["features"]) > 100
    conditioning = pd.read_parquet(tiny_run / "results/conditioning/tiny_a.parquet")
    assert len(conditioning) == len(patches)
    encoded = read_conditioning(tiny_run / "results/conditioning" / conditioning["conditioning"].iloc[0])
    assert encoded.shape == (32, 32, 3)
    quality = pd.read_csv(tiny_run / "results/nuclei/tiny_a.quality.csv").set_index("metric")["value"]
    assert quality["f1"] > 0.3 and quality["images"] == len(patches)


def test_logs_and_benchmarks_written(tiny_run):
    log = (tiny_run / "logs/extract_patches/tiny_a.log").read_text()
    assert "kept" in log and "patches/s" in log
    assert (tiny_run / "results/benchmarks/extract_patches/tiny_a.tsv").is_file()


def test_second_run_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "--dry-run")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_config_of_wrong_type_is_a_schema_error(tmp_path):
    result = snakemake(tmp_path, "--dry-run", "--config", "patches={'size': 'big'}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "'big' is not of type 'integer'" in output and "instance['patches']['size']" in output
