"""Benchmark (not a test): sampling throughput of one diffusion model through the project's
`histosynth.generators.sampling.sample` against a bare diffusers loop on the same model, per sampler; with
--curve, the sampler quality curve of a trained model instead.

    .venv/bin/python benchmarks/sampling.py                        # demo preset's SpadeUNet, random weights, CPU
    .venv/bin/python benchmarks/sampling.py --skip-ddpm --batch 4  # without the 1000-step row
    .venv/bin/python benchmarks/sampling.py --model results/diffusion/model --batch 16 --repaint   # on a GPU
    .venv/bin/python benchmarks/sampling.py --curve --model results/diffusion/model \
        --samplers ddpm-100,ddpm-50,ddim-50,ddim-20,dpmsolver++-20,dpmsolver++-10 --n 32

The curve synthesises --n images per sampler from the demo's training maps (the same maps and
seeds for every sampler) and prints steps -> U-Net evaluations per image -> seconds -> mask
consistency (real-only segmenter, nuclei detector) and offline FD/KD (the segmenter's encoder),
as the workflow's quality stage measures them (benchmarks/diffusion_recipe.py's evaluate).

The bare loop uses no project code: set_timesteps; for t: eps = model(x, t, cond); x = step(eps, t, x).
U-Net calls are counted with a forward hook (evaluations per image: every call sees the whole
batch). project/bare is the time ratio (min over --repeats, runs interleaved); it should be
<= 1.05. --repaint adds histosynth.generators.sampling.repaint (no bare counterpart) for its cost.
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch

SAMPLERS = "ddpm-1000,ddim-50,ddim-20,dpmsolver++-20"


def bare_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


@torch.no_grad()
def bare_loop(model, scheduler, cond, steps: int, generator, channels: int):
    scheduler.set_timesteps(steps, device=cond.device)
    x = torch.randn((len(cond), channels, *cond.shape[-2:]), generator=generator).to(cond.device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t, cond)
        eps = eps.sample if hasattr(eps, "sample") else eps
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


def load_or_build(args):
    """(model, training scheduler config, cond channels, image size), eval mode."""
    from histosynth.config import load_preset
    from histosynth.generators import diffusion
    from histosynth.nuclei.conditioning import channel_names

    if args.model:
        loaded = diffusion.load_diffusion(args.model)
        if loaded.autoencoder is not None or loaded.meta["conditioning"] != "spade":
            raise SystemExit("the bare loop compares a pixel-space SpadeUNet; this model is latent or concat")
        return loaded.model, loaded.scheduler.config, loaded.meta["cond_channels"], loaded.meta["image_size"][0]
    config = load_preset(args.preset)
    cond_channels = len(channel_names(config["classes"], **{f"use_{k}": v for k, v in config["conditioning"].items()}))
    size = args.size or config["patches"]["size"]
    torch.manual_seed(0)
    model = diffusion.build_model(config["diffusion"], 3, cond_channels, size).eval().requires_grad_(False)
    return model, diffusion.train_scheduler(config["diffusion"]).config, cond_channels, size


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder (pixel-space SpadeUNet); default: random weights")
    parser.add_argument(
        "--preset", default="demo", help="config preset (config/<name>.yaml over config.yaml) for the model size"
    )
    parser.add_argument("--size", type=int, default=0, help="patch size (default: the preset's patches.size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loop and sampler (DDPM-1000: 1)")
    parser.add_argument(
        "--samplers", default=SAMPLERS, help="comma-separated NAME-STEPS (NAME: ddpm, ddim, dpmsolver++)"
    )
    parser.add_argument("--skip-ddpm", action="store_true", help="leave out DDPM-1000 (the long row)")
    parser.add_argument("--repaint", action="store_true", help="also time RePaint (50 steps, jump 10, 5 samples)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--curve", action="store_true", help="quality per sampler of the trained --model (see above)")
    parser.add_argument("--n", type=int, default=32, help="--curve: images per sampler")
    parser.add_argument("--guidance", type=float, default=1.0, help="--curve: classifier-free guidance scale")
    parser.add_argument("--results", default="results", help="--curve: the workflow's results folder")
    parser.add_argument("--out", default="results/benchmarks/sampler_curve", help="--curve: output folder")
    args = parser.parse_args(argv)
    if args.curve:
        return curve(args)

    from histosynth.device import pick_device
    from histosynth.generators.sampling import make_sampler, repaint, repaint_scheduler, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, config, cond_channels, size = load_or_build(args)
    model = model.to(device)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cond = (torch.rand(args.batch, cond_channels, size, size, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    cond = cond.to(device)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    channels = model.config.out_channels

    def project(name, steps):
        return lambda: sample(model, make_sampler(name, config), cond, steps=steps, generator=gen())

    def bare(name, steps):
        return lambda: bare_loop(model, bare_scheduler(name, config), cond, steps, gen(), channels)

    project("ddim", 3)(), bare("ddim", 3)()  # warm-up
    print(
        f"device {device}, threads {torch.get_num_threads()}, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, {size} px, {cond_channels} cond channels, batch {args.batch}"
    )
    header = f"{'sampler':<16}{'evals/img':>10}{'project img/s':>15}{'bare img/s':>12}{'project/bare':>14}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.rsplit("-", 1)
        steps = int(steps)
        if args.skip_ddpm and (name, steps) == ("ddpm", 1000):
            continue
        times = {"project": [], "bare": []}
        evals = {}
        for _ in range(1 if steps >= 1000 else args.repeats):
            for loop, fn in (("bare", bare(name, steps)), ("project", project(name, steps))):
                calls.clear()
                times[loop].append(timed(fn, device))
                evals[loop] = len(calls)
        assert evals["project"] == evals["bare"], evals
        best = {loop: min(t) for loop, t in times.items()}
        row = {
            "sampler": f"{name}-{steps}",
            "evals_per_image": evals["project"],
            "batch": args.batch,
            "project_images_per_s": args.batch / best["project"],
            "bare_images_per_s": args.batch / best["bare"],
            "ratio": best["project"] / best["bare"],
        }
        rows.append(row)
        print(
            f"{row['sampler']:<16}{row['evals_per_image']:>10}{row['project_images_per_s']:>15.3f}"
            f"{row['bare_images_per_s']:>12.3f}{row['ratio']:>14.3f}" + ("" if row["ratio"] <= 1.05 else "  > 1.05")
        )
    if args.repaint:
        scheduler = repaint_scheduler(config, eta=1.0)
        keep = torch.ones(args.batch, 1, size, size, device=device)
        keep[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0
        known = torch.zeros(args.batch, channels, size, size, device=device)
        calls.clear()
        seconds = timed(
            lambda: repaint(
                model, scheduler, known, keep, cond, steps=50, jump_length=10, jump_n_sample=5, generator=gen()
            ),
            device,
        )
        row = {
            "sampler": "repaint-50-j10-r5",
            "evals_per_image": len(calls),
            "batch": args.batch,
            "project_images_per_s": args.batch / seconds,
            "bare_images_per_s": None,
            "ratio": None,
        }
        rows.append(row)
        print(f"{row['sampler']:<16}{row['evals_per_image']:>10}{row['project_images_per_s']:>15.3f}{'-':>12}{'-':>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def curve(args) -> int:
    """Rows sampler, steps, evals/image, seconds, consistency and FD/KD for each --samplers entry."""
    from pathlib import Path

    from diffusion_recipe import append_row, demo_inputs, evaluate

    from histosynth.config import load_preset
    from histosynth.device import pick_device
    from histosynth.generators.datasets import read_indexes
    from histosynth.generators.diffusion import load_diffusion
    from histosynth.generators.synthesis import synthesize

    if not args.model:
        raise SystemExit("--curve needs --model (a trained model folder, e.g. results/diffusion/model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_preset(args.preset)
    results, out = Path(args.results), Path(args.out)
    indexes, real = demo_inputs(config, results)
    diffusion = load_diffusion(args.model, device=pick_device(args.device))
    calls = []
    diffusion.model.register_forward_hook(lambda *_: calls.append(1))
    sources = read_indexes(indexes, "train")
    for spec in args.samplers.split(","):
        name, steps = spec.rsplit("-", 1)
        calls.clear()
        start = time.perf_counter()
        synthesize(
            diffusion,
            sources,
            out / spec,
            n=args.n,
            classes=config["classes"],
            conditioning_cfg=config["conditioning"],
            sampler=name,
            steps=int(steps),
            guidance=args.guidance,
            batch_size=config["synthesis"]["batch_size"],
            class_balance=config["synthesis"]["synthesize"]["class_balance"],
            seed=config["seed"],
            grid_per_class=4,
        )
        seconds = time.perf_counter() - start
        batches = -(-args.n // config["synthesis"]["batch_size"])
        row = {
            "sampler": name,
            "steps": int(steps),
            "guidance": args.guidance,
            "evals_per_image": len(calls) // batches,
            "seconds": round(seconds, 1),
            "images_per_s": round(args.n / seconds, 3),
        }
        row.update(evaluate(config, results, real, {"synth": out / spec / "manifest.parquet"}, out / spec))
        append_row(row, out / "curve.csv")
    print(pd.read_csv(out / "curve.csv").to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
