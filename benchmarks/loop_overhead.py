"""Benchmark (not a test): how much of a training step is the model and how much the loop around it.

For a run's diffusion model (trained through histosynth.training.loop.fit) and segmentation
U-Net (one epoch of histosynth.evaluation.segmentation.train, the epoch loop), prints the time
of a bare PyTorch step (the same model, loss and optimiser, one batch already in memory as
tensors) beside histosynth's step on the run's patch files, their ratio (histosynth / bare: the
loop's overhead), and the parts of a step measured alone: data (drawing a batch from the
dataset: file decoding, collation), forward + backward (segmentation: with its dihedral turns,
through segmentation.batch_loss as train does), optimiser (clipping, Adam),
EMA, checkpoint (one save's cost shared out over the config's checkpoint_every steps). Bookkeeping
is what the loop adds beyond those (logging, the NaN guard, progress, the accelerator).

Machines shared with other work time noisily, so the two are measured side by side: the diffusion
bare step runs inside fit's per-step hook, after each of fit's steps (medians); segmentation
epochs alternate with bare epochs (the fastest of each).

    .venv/bin/python benchmarks/loop_overhead.py                       # the demo run in results/
    .venv/bin/python benchmarks/loop_overhead.py --results RUN/results --config RUN/config.yaml --steps 40

It reads the run's patch and conditioning indexes (train split) and the config's `diffusion`
and `segmentation` sections; torch threads as the workflow's jobs set them (--threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from histosynth.config import load_config


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def diffusion(results: Path, config: dict, steps: int, warmup: int) -> dict:
    """The diffusion step: bare and its parts, then `fit` on the run's files over warmup + steps."""
    from histosynth.config import section_defaults
    from histosynth.device import pick_device, prepare_model
    from histosynth.generators.datasets import patch_dataset
    from histosynth.generators.diffusion import build_model, train_scheduler
    from histosynth.generators.train_diffusion import denoising_loss
    from histosynth.training.batches import epoch_order, loader
    from histosynth.training.ema import EMA
    from histosynth.training.loop import fit

    c = section_defaults("diffusion", config.get("diffusion"))
    s = dict(c["train"])
    dataset = patch_dataset(sorted(map(str, (results / "conditioning").glob("*.parquet"))), "train", config)
    device = pick_device(s["device"])
    scheduler = train_scheduler(c)
    loss_fn = denoising_loss(c, scheduler, scheduler.alphas_cumprod.to(device))
    first = dataset[0]

    def new_model():
        torch.manual_seed(0)
        return prepare_model(
            build_model(c, first["image"].shape[0], first["cond"].shape[0], first["image"].shape[-1]), device
        )

    # bare: one batch in memory, forward + backward + clip + Adam
    model = new_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=s["lr"])
    order = epoch_order(len(dataset), 0, 0)
    batches = iter(loader(dataset, order, s["batch_size"], s["num_workers"], 0, 0))
    batch = {k: v.to(device) for k, v in next(batches).items()}
    ema = EMA(model, s["ema_decay"], s["ema_warmup"])

    def forward_backward():
        loss, _ = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def optimise():
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        optimizer.step()

    def next_batch():
        nonlocal batches
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader(dataset, order, s["batch_size"], s["num_workers"], 0, 0))

    for _ in range(warmup):
        forward_backward()
        optimise()

    # histosynth's step, interleaved with the bare one: fit's hook times the bare step's parts
    # after each of fit's steps, so both see the machine in the same state; fit's step is the time
    # between hooks. One checkpoint mid-window, its cost shared out over checkpoint_every steps.
    fit_times, part_times, last = [], {"data": [], "forward_backward": [], "optimiser": [], "ema": []}, [None]
    timed = {
        "data": next_batch,
        "forward_backward": forward_backward,
        "optimiser": optimise,
        "ema": lambda: ema.update(model),
    }

    def hook(step, _):
        if last[0] is not None:
            fit_times.append(time.perf_counter() - last[0])
        for name, fn in timed.items():
            part_times[name].append(_median_seconds(fn, 1))
        last[0] = time.perf_counter()

    checkpoint_step = warmup + steps // 2
    settings = {**s, "steps": warmup + steps, "sample_every": 0, "checkpoint_every": checkpoint_step}
    with tempfile.TemporaryDirectory() as tmp:
        fit(new_model(), loss_fn, dataset, tmp, settings=settings, run_config={"benchmark": True}, seed=0, on_step=hook)
    parts = {name: statistics.median(times[warmup:]) for name, times in part_times.items()}
    bare = parts["forward_backward"] + parts["optimiser"]
    step = statistics.median(fit_times[warmup:])
    parts["checkpoint"] = max(0.0, fit_times[checkpoint_step - 1] - step) / s["checkpoint_every"]
    step += parts["checkpoint"]
    return _row("diffusion step (fit)", s["batch_size"], bare, step, parts)


def segmentation(results: Path, config: dict, steps: int, warmup: int, trials: int = 3) -> dict:
    """One segmentation epoch: bare (batches in memory) and histosynth's (segmentation.train, no validation)."""
    import pandas as pd

    from histosynth.config import section_defaults
    from histosynth.device import pick_device, prepare_model
    from histosynth.evaluation.segmentation import (
        BceDiceLoss,
        SegmentationDataset,
        batch_loss,
        build_model,
        split_rows,
        target_classes,
        train,
    )
    from histosynth.training.epochs import data_loader

    s = section_defaults("segmentation", config.get("segmentation"))
    rows = split_rows(sorted(map(str, (results / "patches").glob("*.parquet"))), "train")
    rows = rows.iloc[: steps * s["batch_size"]]  # `steps` batches an epoch
    classes = target_classes(config["classes"], s["classes"])
    device = pick_device(s["device"])
    dataset = SegmentationDataset(rows, list(classes.values()))
    loss_fn = BceDiceLoss(s["bce_weight"], s["dice_weight"])
    torch.manual_seed(0)
    net = prepare_model(build_model(s, len(classes)), device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=float(s["lr"]))
    in_memory = list(data_loader(dataset, s["batch_size"], 0, s["num_workers"]))
    ops = torch.randint(0, 8, (s["batch_size"],))

    def bare_epoch() -> dict:
        """One epoch over the in-memory batches (turned as segmentation.train turns them); the seconds of each part, summed."""
        spent = {"forward_backward": 0.0, "optimiser": 0.0}
        for item in in_memory:
            start = time.perf_counter()
            loss = batch_loss(net, loss_fn, item["image"], item["target"], ops[: len(item["image"])], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            end = time.perf_counter()
            optimizer.step()
            spent["forward_backward"] += end - start
            spent["optimiser"] += time.perf_counter() - end
        return spent

    for _ in range(warmup):
        bare_epoch()
    # bare and histosynth epochs in turn, the fastest of each (interference only slows a run down)
    # two epochs, the second timed: the first pays a new model's first-pass costs, which the bare epochs paid in warm-up
    settings = {**config.get("segmentation", {}), "epochs": 2, "patience": 100}
    bare_epochs, fit_epochs = [], []
    for _ in range(trials):
        start = time.perf_counter()
        spent = {"data": 0.0, **bare_epoch()}
        for _ in data_loader(dataset, s["batch_size"], 0, s["num_workers"]):
            pass
        spent["data"] = time.perf_counter() - start - sum(spent.values())
        bare_epochs.append(spent)
        with tempfile.TemporaryDirectory() as tmp:
            train(
                rows,
                pd.DataFrame(),
                config["classes"],
                Path(tmp) / "run",
                settings=settings,
                seed=0,
                weights_dir=tmp,
                progress=False,
            )
            fit_epochs.append(float(pd.read_csv(Path(tmp) / "run" / "loss.csv")["seconds"].iloc[-1]))
    fastest = min(bare_epochs, key=lambda spent: sum(spent.values()) - spent["data"])
    parts = {name: seconds / len(in_memory) for name, seconds in fastest.items()}
    bare = parts["forward_backward"] + parts["optimiser"]
    step = min(fit_epochs) / len(in_memory)
    return _row("segmentation epoch (fit_epochs)", s["batch_size"], bare, step, parts)


def _row(name: str, batch: int, bare: float, step: float, parts: dict) -> dict:
    return {
        "loop": name,
        "batch": batch,
        "bare_step_s": round(bare, 4),
        "histosynth_step_s": round(step, 4),
        "overhead_ratio": round(step / bare, 3),
        **{f"{k}_s": round(v, 4) for k, v in parts.items()},
        "bookkeeping_s": round(step - sum(parts.values()), 4),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="a run's results folder (patches/, conditioning/)")
    parser.add_argument("--config", default="config/config.yaml", help="the run's config")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (segmentation: batches in the epoch)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the jobs': the rule's threads)")
    parser.add_argument("--only", choices=["diffusion", "segmentation"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    rows = []
    for name, fn in [("diffusion", diffusion), ("segmentation", segmentation)]:
        if args.only in (None, name):
            rows.append(fn(Path(args.results), config, args.steps, args.warmup))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
