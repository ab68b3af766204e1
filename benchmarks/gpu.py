"""Benchmark (not a test): the GPU pass, one command, one table. On one H100/H200-class GPU with the
thesis preset it takes a few minutes; `--device cpu --tiny` runs the same code paths in seconds
(the test suite does).

    .venv/bin/python benchmarks/gpu.py                         # thesis preset on the GPU
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny     # tiny preset, CPU, no torch.compile

Rows (kind, name): the diffusion model's training step (the workflow's own objective,
train_diffusion.denoising_loss, on the preset's latent size) in fp32, bf16 autocast, bf16 +
channels_last and, on CUDA, bf16 + channels_last + torch.compile; sampling at the patch size
(latents decoded by the preset's autoencoder) with DDPM-1000, DDIM-50 and DPM-Solver++-20 at the
largest batch that fits (doubling until out of memory, at most --max-batch), timed for one and
for --sample-steps denoising steps and projected to the sampler's step count; the segmentation
network's training step. Columns: batch, seconds per step, samples (or images) per second, peak
GPU memory, FLOPs per step (torch.utils.flop_counter, forward + backward for training) and the
achieved FLOP/s against the card's bf16 dense peak when the card is known. Printed, and written
as CSV to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import pandas as pd
import torch

# bf16 dense tensor-core peaks (FLOP/s) by device-name fragment
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpmsolver++", 20))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def row(kind: str, name: str, batch: int, seconds: float, flops: int | None, device, peak) -> dict:
    achieved = flops / seconds if flops else None
    return {
        "kind": kind,
        "name": name,
        "batch": batch,
        "step_s": round(seconds, 5),
        "per_s": round(batch / seconds, 2),
        "peak_gpu_gb": peak_memory_gb(device),
        "gflop_per_step": round(flops / 1e9, 2) if flops else None,
        "achieved_gflop_s": round(achieved / 1e9, 2) if achieved else None,
        "of_peak": round(achieved / peak, 3) if achieved and peak else None,
    }


def diffusion_parts(config: dict, device: torch.device):
    """The preset's diffusion model, training scheduler, autoencoder (latent space) and the shapes."""
    from histosynth.generators.autoencoder import build_autoencoder
    from histosynth.generators.diffusion import build_model, train_scheduler
    from histosynth.nuclei.conditioning import channel_names

    size = config["patches"]["size"]
    c = config["conditioning"]
    cond_channels = len(
        channel_names(
            config["classes"], use_regions=c["regions"], use_nuclei=c["nuclei"], use_boundaries=c["boundaries"]
        )
    )
    ae = None
    if config["diffusion"]["space"] == "latent":
        ae = build_autoencoder(config["autoencoder"], 3, size).to(device).eval()
        latent = size // config["autoencoder"]["factor"]
        channels = config["autoencoder"]["latent_channels"]
    else:
        latent, channels = size, 3
    model = build_model(config["diffusion"], channels, cond_channels, latent)
    return model, train_scheduler(config["diffusion"]), ae, size, latent, channels, cond_channels


def train_rows(config: dict, device, args, peak) -> list[dict]:
    """The diffusion training step in each precision/memory-format/compile variant."""
    from histosynth.generators.train_diffusion import denoising_loss

    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+channels_last", True, True, False)]
    if device.type == "cuda" and not args.no_compile:
        variants.append(("bf16+channels_last+compile", True, True, True))
    rows = []
    for name, bf16, channels_last, compiled in variants:
        torch.manual_seed(0)
        model, scheduler, _, _, latent, channels, cond_channels = diffusion_parts(config, device)
        model = model.to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if compiled else model
        batch = args.batch or config["diffusion"]["train"]["batch_size"]
        # the latent-space objective on latents directly: the frozen encoder is not part of the step
        loss_fn = denoising_loss(config["diffusion"], scheduler, scheduler.alphas_cumprod.to(device))
        data = {
            "image": torch.randn(batch, channels, latent, latent, device=device),
            "cond": (torch.rand(batch, cond_channels, latent, latent, device=device) > 0.5).float(),
        }
        if config["diffusion"]["num_classes"]:
            data["label"] = torch.zeros(batch, dtype=torch.long, device=device)
        if channels_last:
            data = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in data.items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = loss_fn(step_model, data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        reset_memory(device)
        seconds = timed(step, device, args.steps, args.warmup + (2 if compiled else 0))
        flops = None if compiled else flops_of(step)
        rows.append(row("diffusion_train", name, batch, seconds, flops, device, peak))
    return rows


def largest_batch(fn, start: int, limit: int, device) -> int:
    """The largest batch (doubling from `start`, at most `limit`) fn(batch) runs without running out of memory."""
    best, batch = start, start
    while batch <= limit:
        try:
            fn(batch)
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            reset_memory(device)
    return best


def sample_rows(config: dict, device, args, peak) -> list[dict]:
    """Images per second of each sampler at the patch size, at the largest batch that fits."""
    from histosynth.generators.sampling import make_sampler, sample

    torch.manual_seed(0)
    model, scheduler, ae, size, _, _, cond_channels = diffusion_parts(config, device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    rows = []

    def run(name: str, batch: int, steps: int) -> None:
        cond = (torch.rand(batch, cond_channels, size, size, device=device) > 0.5).float()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sample(model, make_sampler(name, scheduler.config), cond, steps=steps, autoencoder=ae)

    batch = args.batch or largest_batch(lambda b: run("ddim", b, 1), 2, args.max_batch, device)
    for name, steps in SAMPLERS:
        k = max(2, min(steps, args.sample_steps))
        reset_memory(device)
        one = timed(lambda: run(name, batch, 1), device, 1, 1)  # one step, noise and decoding
        several = timed(lambda: run(name, batch, k), device, 1, 0)
        # projected to the sampler's steps; a negative difference is timing noise (tiny models), not a free step
        seconds = one + max(0.0, several - one) / (k - 1) * (steps - 1)
        rows.append(
            row(
                "sampling",
                f"{name}-{steps}" + ("" if k == steps else f" (from {k} steps)"),
                batch,
                seconds,
                None,
                device,
                peak,
            )
        )
    return rows


def segmentation_rows(config: dict, device, args, peak) -> list[dict]:
    from histosynth.evaluation.segmentation import build_model

    torch.manual_seed(0)
    s = config["segmentation"]
    net = build_model(s, len(config["classes"])).to(device).train()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    batch, size = args.batch or s["batch_size"], config["patches"]["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, len(config["classes"]), size, size, device=device) > 0.5).float()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    reset_memory(device)
    seconds = timed(step, device, args.steps, args.warmup)
    return [
        row(
            "segmentation_train",
            s["encoder"] + (" bf16" if device.type == "cuda" else " fp32"),
            batch,
            seconds,
            flops_of(step),
            device,
            peak,
        )
    ]


def projection(table: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Hours at the preset's scale from the measured rates: the diffusion training (its steps at the
    preset's batch, at the fastest measured step per image) and one synthetic set (synthesis.synthesize.n
    images with its sampler, at that sampler's measured seconds per image, scaled to its steps). The
    autoencoder's training (latent space) is not measured and not included."""
    train = table[table["kind"] == "diffusion_train"]
    settings = config["diffusion"]["train"]
    train_h = settings["steps"] * settings["batch_size"] * (train["step_s"] / train["batch"]).min() / 3600
    synthesize = config["synthesis"]["synthesize"]
    sampling = table[table["kind"] == "sampling"]
    measured = sampling[sampling["name"].str.startswith(f"{synthesize['sampler']}-")].iloc[0]
    measured_steps = int(measured["name"].split("-")[-1].split()[0])
    per_image = measured["step_s"] / measured["batch"] * synthesize["steps"] / measured_steps
    return pd.DataFrame(
        [
            {
                "work": "diffusion training",
                "scale": f"{settings['steps']} steps x batch {settings['batch_size']}",
                "hours": train_h,
            },
            {
                "work": "synthetic patches",
                "scale": f"{synthesize['n']} images, {synthesize['sampler']}-{synthesize['steps']}",
                "hours": synthesize["n"] * per_image / 3600,
            },
        ]
    )


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny preset (CI-sized models) instead of the thesis one"
    )
    parser.add_argument("--preset", help="a preset name (config/<name>.yaml over config.yaml); overrides --tiny")
    parser.add_argument(
        "--batch", type=int, help="one batch for every row (default: the preset's, largest for sampling)"
    )
    parser.add_argument("--max-batch", type=int, default=1024, help="largest sampling batch tried")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sample-steps", type=int, default=10, help="denoising steps timed per sampler")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", default="results/benchmarks/gpu.csv", help="CSV of the table")
    args = parser.parse_args(argv)

    from histosynth.config import load_preset
    from histosynth.device import pick_device

    device = pick_device(args.device)
    config = load_preset(args.preset or ("tiny" if args.tiny else "thesis"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    started = time.perf_counter()
    rows = (
        train_rows(config, device, args, peak)
        + sample_rows(config, device, args, peak)
        + segmentation_rows(config, device, args, peak)
    )
    table = pd.DataFrame(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{name}; preset {args.preset or ('tiny' if args.tiny else 'thesis')}; "
        f"bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
        if peak
        else f"{name}; peak unknown"
    )
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
        print("projected on this device from the rates above (one GPU, the preset's scale):")
        print(projection(table, config).to_string(index=False, float_format=lambda h: f"{h:.3g}"))
    print(f"{time.perf_counter() - started:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    with contextlib.suppress(ValueError):
        print(f"-> {out.resolve().relative_to(Path.cwd())}")
    return table


if __name__ == "__main__":
    main()
