"""benchmarks/gpu.py in its CPU tiny mode: every row measured, the table written."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_in_tiny_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks/gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.csv"
    table = gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--sample-steps", "2",
                      "--max-batch", "4", "--out", str(out)])
    assert list(table["name"]) == ["fp32", "bf16", "bf16+channels_last", "ddpm-1000 (from 2 steps)",
                                   "ddim-50 (from 2 steps)", "dpmsolver++-20 (from 2 steps)", "resnet18 fp32"]
    assert (table["per_s"] > 0).all() and (table["step_s"] > 0).all()
    train = table[table["kind"].isin(["diffusion_train", "segmentation_train"])]
    assert (train["gflop_per_step"] > 0).all() and (train["achieved_gflop_s"] > 0).all()
    # (no ordering of the samplers' times: at tiny scale a 2-step difference is within the machine's
    # timing noise, and the projection from it can put DDPM-1000 below DDIM-50)
    assert table["batch"].iloc[3] == 4  # the largest sampling batch that fits, capped at --max-batch
    assert pd.read_csv(out).shape == table.shape
    printed = capsys.readouterr().out
    assert "CPU" in printed and "projected on this device" in printed
    from histosynth.config import load_preset

    config = load_preset("tiny")
    projected = gpu.projection(table, config).set_index("work")["hours"]
    train = table[table["kind"] == "diffusion_train"]
    steps, batch = config["diffusion"]["train"]["steps"], config["diffusion"]["train"]["batch_size"]
    assert projected["diffusion training"] == pytest.approx(steps * batch * (train["step_s"] / train["batch"]).min() / 3600)
    assert projected["synthetic patches"] > 0
