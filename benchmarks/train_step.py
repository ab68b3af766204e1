"""Benchmark (not a test): training-step time and throughput of the diffusion, autoencoder or
segmentation model of a preset on the available device, under each speed setting alone and
combined: channels_last memory format, bf16 autocast, torch.compile (peak GPU memory on CUDA).
Also prints the loss after the timed steps (same start, same batch): how far a setting moves
what is learned. Always prints the thesis preset's parameter count.

    .venv/bin/python benchmarks/train_step.py --preset demo
    .venv/bin/python benchmarks/train_step.py --preset demo --stage segmentation --threads 1
    .venv/bin/python benchmarks/train_step.py --preset thesis --size 256      # on a GPU

A step is what `fit` does per batch: forward, loss (diffusion: MSE on the noise; autoencoder:
reconstruction + VQ loss; segmentation: BCE + Dice), backward, gradient clipping, Adam step.
Synthetic inputs; the first --warmup steps are not timed (they include compilation).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(stage: str, preset: str, image_size: int, cond_channels: int):
    """(config section, model, loss(model, x, cond), cond channels) of a preset's stage."""
    from histosynth.config import load_preset, section_defaults
    from histosynth.generators import autoencoder, diffusion

    preset_config = load_preset(preset)
    config = section_defaults(stage, preset_config.get(stage))
    if stage == "diffusion":
        model = diffusion.build_model(config, 3, cond_channels, image_size)

        def loss(model, x, cond):
            t = torch.randint(0, 1000, (len(x),), device=x.device)
            noise = torch.randn_like(x)
            return torch.nn.functional.mse_loss(diffusion.model_output(model, x + noise, t, cond).float(), noise)
    elif stage == "segmentation":
        from histosynth.evaluation.segmentation import BceDiceLoss, build_model

        cond_channels = len(preset_config["classes"])
        model = build_model(config, cond_channels)
        dice_bce = BceDiceLoss(config["bce_weight"], config["dice_weight"])

        def loss(model, x, cond):
            return dice_bce(model(x).float(), cond)
    else:
        model = autoencoder.build_autoencoder(config, 3, image_size)

        def loss(model, x, cond):
            recon, codebook = model(x, return_dict=False) if config["kind"] == "vq" else (model(x).sample, 0.0)
            return torch.nn.functional.l1_loss(recon.float(), x) + codebook

    return config, model, loss, cond_channels


VARIANTS = {  # name: (channels_last, bf16 autocast, torch.compile)
    "fp32": (False, False, False),
    "channels_last": (True, False, False),
    "bf16": (False, True, False),
    "compile": (False, False, True),
    "channels_last+compile": (True, False, True),
    "channels_last+bf16+compile": (True, True, True),
}


def time_steps(
    model, loss, batch: int, size: int, cond_channels: int, device, steps: int, warmup: int, variant: str
) -> dict:
    """Median step time of `model` under a VARIANTS setting, and the loss after warmup + steps steps."""
    channels_last, bf16, compiled = VARIANTS[variant]
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).clamp(-1, 1).to(device)
    cond = (torch.rand(batch, cond_channels, size, size, generator=generator) > 0.5).float().to(device)
    if channels_last:
        x, cond = x.contiguous(memory_format=torch.channels_last), cond.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, first = [], None
    torch.manual_seed(0)
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss(forward, x, cond)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = first if first is not None else time.perf_counter() - start
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    row = {
        "variant": variant,
        "batch": batch,
        "size": size,
        "first_step_s": round(first, 2),
        "step_s": round(seconds, 4),
        "samples_per_s": round(batch / seconds, 2),
        "loss_after": round(float(value), 5),
    }
    if device.type == "cuda":
        row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "demo", "thesis"], default="demo")
    parser.add_argument("--stage", choices=["diffusion", "autoencoder", "segmentation"], default="diffusion")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--size", type=int, help="patch size (default: tiny 16, demo 64, thesis 256)")
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's train.batch_size)")
    parser.add_argument("--cond-channels", type=int, default=5, help="conditioning channels")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    from histosynth.config import load_preset
    from histosynth.device import pick_device
    from histosynth.generators.diffusion import build_model, parameter_count

    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.device("meta"):
        thesis = build_model(load_preset("thesis")["diffusion"], 3, args.cond_channels, 256)
    print(
        json.dumps(
            {
                "thesis_diffusion_parameters": parameter_count(thesis),
                "thesis_diffusion_parameters_M": round(parameter_count(thesis) / 1e6, 2),
            }
        )
    )

    device = pick_device(args.device)
    size = args.size or {"tiny": 16, "demo": 64, "thesis": 256}[args.preset]
    for variant in args.variants:
        torch.manual_seed(0)
        config, model, loss, cond_channels = build(args.stage, args.preset, size, args.cond_channels)
        batch = args.batch or (config["train"]["batch_size"] if "train" in config else config["batch_size"])
        row = time_steps(model, loss, batch, size, cond_channels, device, args.steps, args.warmup, variant)
        print(
            json.dumps(
                {
                    "stage": args.stage,
                    "preset": args.preset,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "parameters": parameter_count(model),
                    **row,
                }
            ),
            flush=True,
        )
        del model
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
