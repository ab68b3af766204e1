"""Benchmark (not a test): training-step time and throughput of the diffusion (or autoencoder)
model of a preset on the available device; fp32 vs bf16 autocast and peak GPU memory on CUDA.
Always prints the thesis preset's parameter count.

    .venv/bin/python benchmarks/train_step.py --preset demo
    .venv/bin/python benchmarks/train_step.py --preset thesis --size 256      # on a GPU
    .venv/bin/python benchmarks/train_step.py --preset tiny --stage autoencoder --threads 1

A step is what `fit` does per batch: forward, MSE on the noise (or reconstruction + VQ loss),
backward, gradient clipping, Adam step. Synthetic inputs; the first --warmup steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(stage: str, preset: str, image_size: int, cond_channels: int):
    from histosynth.config import load_preset
    from histosynth.generators import autoencoder, diffusion

    config = load_preset(preset)[stage]
    if stage == "diffusion":
        model = diffusion.build_model(config, 3, cond_channels, image_size)

        def loss(model, x, cond):
            t = torch.randint(0, 1000, (len(x),), device=x.device)
            noise = torch.randn_like(x)
            return torch.nn.functional.mse_loss(diffusion.model_output(model, x + noise, t, cond).float(), noise)
    else:
        model = autoencoder.build_autoencoder(config, 3, image_size)

        def loss(model, x, cond):
            recon, codebook = model(x, return_dict=False) if config["kind"] == "vq" else (model(x).sample, 0.0)
            return torch.nn.functional.l1_loss(recon.float(), x) + codebook

    return config, model, loss


def time_steps(
    model, loss, batch: int, size: int, cond_channels: int, device, steps: int, warmup: int, bf16: bool
) -> dict:
    from histosynth.device import prepare_model

    model = prepare_model(model, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).clamp(-1, 1)
    cond = (torch.rand(batch, cond_channels, size, size, device=device) > 0.5).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss(model, x, cond)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    row = {
        "precision": "bf16" if bf16 else "fp32",
        "batch": batch,
        "size": size,
        "step_s": round(seconds, 4),
        "samples_per_s": round(batch / seconds, 2),
    }
    if device.type == "cuda":
        row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "demo", "thesis"], default="demo")
    parser.add_argument("--stage", choices=["diffusion", "autoencoder"], default="diffusion")
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
    for bf16 in [False, True] if device.type == "cuda" else [False]:
        torch.manual_seed(0)
        config, model, loss = build(args.stage, args.preset, size, args.cond_channels)
        batch = args.batch or config["train"]["batch_size"]
        row = time_steps(model, loss, batch, size, args.cond_channels, device, args.steps, args.warmup, bf16)
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
            )
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
