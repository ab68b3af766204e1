"""The multi-process training path on CPU, as CI can run it: rule train_diffusion's `launch(..., gpus=2)` starts
`accelerate launch` with two gloo processes on a tiny conditioning index. The run writes its model, checkpoints
and loss.csv; a run killed (SIGKILL, every process) after a checkpoint resumes to the uninterrupted run's
weights bit for bit; and two processes follow a one-process run with the same global batch up to float rounding."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from histosynth.config import load_preset
from histosynth.data.io import write_png, write_table
from histosynth.generators.launch import launch
from histosynth.nuclei.conditioning import write_conditioning
from histosynth.training.checkpoints import checkpoints

from helpers import Shapes, assert_identical, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 16  # 8 training patches in global batches of 4: 2 steps an epoch, 8 epochs


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """What rule train_diffusion passes to launch: the job's config (the tiny preset, a 16 px pixel-space
    SPADE model, labels resolved from the sheet) and a conditioning index of 8 train and 2 val patches
    (Shapes written as PNGs, their masks as encoded conditioning maps)."""
    root = tmp_path_factory.mktemp("patches")
    rows = []
    for split, n in (("train", 8), ("val", 2)):
        data = Shapes(n=n)
        for i in range(n):
            item, patch_id = data[i], f"{split}-{i}"
            write_png(
                ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8),
                root / f"{patch_id}.png",
            )
            encoded = np.zeros((16, 16, 3), np.uint8)
            encoded[..., 0] = item["cond"][1].numpy().astype(np.uint8)  # region class 1 in the square
            encoded[..., 2] = (item["cond"][2].numpy() > 0) * 255  # its outline as boundary pixels
            write_conditioning(encoded, root / f"{patch_id}.cond.png")
            rows.append(
                {
                    "slide": f"slide-{split}",
                    "patch_id": patch_id,
                    "split": split,
                    "label": "ab"[int(item["label"])],
                    "image": f"{patch_id}.png",
                    "conditioning": f"{patch_id}.cond.png",
                }
            )
    write_table(pd.DataFrame(rows), root / "index.parquet")
    config = load_preset("tiny")
    config["labels"] = {
        "source": "sheet",
        "classes": ["a", "b"],
        "regions": list(config["classes"]),
        "background": "background",
    }
    config["diffusion"] = {**tiny(steps=STEPS, checkpoint_every=2), "space": "pixel"}
    config["seed"] = 3
    return {"config": config, "indexes": [str(root / "index.parquet")]}


def run(job: dict, out: Path, gpus: int = 2) -> None:
    launch(
        "diffusion",
        job["config"],
        job["indexes"],
        out,
        checkpoints=out / "checkpoints",
        log=out / "train.log",
        gpus=gpus,
        threads=gpus,
    )


def losses(out: Path) -> list[dict]:
    with open(out / "loss.csv") as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict:
    return load_file(next(folder.glob("*.safetensors")))


@pytest.fixture(scope="module")
def straight(job, tmp_path_factory) -> Path:
    """An uninterrupted two-process run."""
    out = tmp_path_factory.mktemp("straight")
    run(job, out)
    return out


def test_two_processes_write_model_checkpoints_and_losses(straight):
    assert [int(p.name[5:]) for p in checkpoints(straight / "checkpoints")] == [STEPS - 2, STEPS]  # keep_checkpoints=2
    meta = json.loads((straight / "model" / "histosynth.json").read_text())
    assert (
        meta["steps"] == STEPS
        and json.loads((straight / f"checkpoints/step-{STEPS}/config.json").read_text())["processes"] == 2
    )
    assert weights(straight / "model")  # the EMA weights
    rows = losses(straight)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1)) and all(
        np.isfinite(float(r["loss"])) for r in rows
    )
    log = (straight / "train.log").read_text()
    assert "2 processes (gloo backend, cpu): each step's batch of 4 is 2 items per process" in log


def test_two_processes_follow_one_process_with_the_same_global_batch(job, straight, tmp_path):
    """One process (in this process: launch(gpus=1) would turn this process's stderr into its log), batch 4, against
    two with 2 each: same items per step, same noise, timesteps and mask dropout per item, gradients averaged."""
    from histosynth.generators.datasets import patch_dataset
    from histosynth.generators.train_diffusion import train_diffusion

    config, indexes = job["config"], job["indexes"]
    train_diffusion(
        patch_dataset(indexes, "train", config),
        tmp_path,
        config["diffusion"],
        seed=config["seed"],
        val_dataset=patch_dataset(indexes, "val", config),
        checkpoint_dir=tmp_path / "checkpoints",
    )
    one, two = losses(tmp_path), losses(straight)
    assert [r["step"] for r in one] == [r["step"] for r in two] and [r["epoch"] for r in one] == [
        r["epoch"] for r in two
    ]
    np.testing.assert_allclose([float(r["loss"]) for r in two], [float(r["loss"]) for r in one], rtol=1e-4)
    a, b = weights(tmp_path / "model"), weights(straight / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(job, straight, tmp_path):
    """The job as Snakemake runs it (a Python calling launch), SIGKILLed with its launcher and both trainers once the
    first checkpoint is written, then rerun: it resumes there and ends where the uninterrupted run ends."""
    out = tmp_path / "killed"
    code = (
        f"import json, sys; from histosynth.generators.launch import launch; job = json.loads(sys.argv[1]); "
        f"launch('diffusion', job['config'], job['indexes'], {str(out)!r}, checkpoints={str(out / 'checkpoints')!r}, "
        f"log={str(out / 'train.log')!r}, gpus=2, threads=2)"
    )
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], start_new_session=True)
    job_process, deadline = psutil.Process(process.pid), time.monotonic() + 120
    try:
        while not checkpoints(out / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        exited = process.poll()
    finally:  # whatever happened, no trainer outlives the test
        tree = [job_process, *job_process.children(recursive=True)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=30)
    log = out / "train.log"
    assert exited is None, (
        f"the job ended (exit {exited}) before its first checkpoint: {log.read_text()[-3000:] if log.exists() else ''}"
    )
    assert len(tree) >= 4, f"expected the job, its launcher and 2 trainers, found {[p.pid for p in tree]}"
    psutil.wait_procs(tree, timeout=30)
    saved = [int(p.name[5:]) for p in checkpoints(out / "checkpoints")]
    assert saved and max(saved) < STEPS, f"the kill came too late: checkpoints {saved}"
    assert not (out / "model").exists()
    run(job, out)
    assert f"resuming from {out / 'checkpoints'}/step-{max(saved)} (step {max(saved)} of {STEPS})" in log.read_text()
    assert_identical(weights(straight / "model"), weights(out / "model"))
    assert_identical(
        weights(straight / f"checkpoints/step-{STEPS}/model"), weights(out / f"checkpoints/step-{STEPS}/model")
    )
    assert [(r["step"], r["loss"]) for r in losses(out)] == [(r["step"], r["loss"]) for r in losses(straight)]
