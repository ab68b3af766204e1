"""benchmarks/gpu.py in its CPU tiny mode: every row measured, the table written; and its projection
to a preset's scale, checked on a table of chosen timings against hours worked out by hand."""

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks/gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_on_cpu_in_tiny_mode(gpu, tmp_path, capsys):
    out = tmp_path / "gpu.csv"
    table = gpu.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--sample-steps",
            "2",
            "--max-batch",
            "4",
            "--out",
            str(out),
        ]
    )
    assert list(table["name"]) == [
        "fp32",
        "bf16",
        "bf16+channels_last",
        "ddpm-1000 (from 2 steps)",
        "ddim-50 (from 2 steps)",
        "dpmsolver++-20 (from 2 steps)",
        "resnet18 fp32",
    ]
    assert table[["per_s", "step_s"]].notna().all().all()  # every row measured (how fast is the machine's business)
    train = table[table["kind"].isin(["diffusion_train", "segmentation_train"])]
    assert (train["gflop_per_step"] > 0).all()  # counted from the models, not timed
    assert table["batch"].iloc[3] == 4  # the largest sampling batch that fits, capped at --max-batch
    assert pd.read_csv(out).shape == table.shape
    printed = capsys.readouterr().out
    assert "CPU" in printed and "projected on this device" in printed
    from histosynth.config import load_preset

    projected = gpu.projection(table, load_preset("tiny")).set_index("work")["hours"]
    assert list(projected.index) == ["diffusion training", "synthetic patches"]


def test_projection_scales_the_fastest_measured_rates_to_the_preset(gpu):
    """Training: the faster of 0.5 and 0.75 s per image, 100 steps of 8 images: 400 s. Sampling:
    DDIM measured at 10 s per batch of 4 for 50 steps, run at 25 steps: 1.25 s an image, 144
    images: 180 s."""
    table = pd.DataFrame(
        [
            {"kind": "diffusion_train", "name": "fp32", "step_s": 3.0, "batch": 4},
            {"kind": "diffusion_train", "name": "bf16", "step_s": 2.0, "batch": 4},
            {"kind": "sampling", "name": "ddpm-1000 (from 2 steps)", "step_s": 99.0, "batch": 4},
            {"kind": "sampling", "name": "ddim-50 (from 2 steps)", "step_s": 10.0, "batch": 4},
        ]
    )
    config = {
        "diffusion": {"train": {"steps": 100, "batch_size": 8}},
        "synthesis": {"synthesize": {"n": 144, "sampler": "ddim", "steps": 25}},
    }
    hours = gpu.projection(table, config).set_index("work")["hours"]
    assert math.isclose(hours["diffusion training"], 400 / 3600)
    assert math.isclose(hours["synthetic patches"], 180 / 3600)


def test_job_times_sums_each_rules_jobs_costliest_first(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("job_times", REPO / "benchmarks/job_times.py")
    job_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job_times)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    files = {
        "train_diffusion.tsv": [(900.0, "812.5")],
        "train_segmentation/real/seed0.tsv": [(100.0, "1500.1")],
        "train_segmentation/syn48/seed1.tsv": [(80.0, "-")],  # Snakemake writes '-' for a job too short to sample
        "summarize.tsv": [(2.5, "300.0")],
    }
    for name, rows in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "".join(f"{s}\t0:00:00\t{rss}\t0\t0\t0\t0\t0\t0\t0\n" for s, rss in rows))
    table = job_times.main([str(tmp_path)])
    assert list(table.index) == ["train_diffusion", "train_segmentation", "summarize", "all jobs"]
    assert table.loc["train_segmentation", "jobs"] == 2 and table.loc["train_segmentation", "total_s"] == 180.0
    assert (
        table.loc["train_segmentation", "longest_s"] == 100.0
        and table.loc["train_segmentation", "max_rss_mb"] == 1500.1
    )
    assert table.loc["all jobs", "total_s"] == 1082.5 and table.loc["all jobs", "jobs"] == 4
    assert "train_diffusion" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no benchmark files"):
        job_times.main([str(tmp_path / "empty")])
