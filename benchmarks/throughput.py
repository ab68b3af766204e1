"""Benchmark (not a test): patch extraction against histolab, each run a whole process, and the
per-slide stages' patches/s (nuclei_masks, conditioning_maps) on one process and on several.

    .venv/bin/python benchmarks/throughput.py --slide ../shared/realdata/cmu1-small-region/CMU-1-Small-Region.svs \\
        --demo-sizes 8192 32768 --histolab-python /tmp/hlvenv/bin/python --before /tmp/histosynth-before

Patches: every tool cuts 256 px windows at level 0 with stride 128, keeps those with >= 50 % tissue
and writes PNGs. Each run is a fresh process timed whole (start-up and imports included), the tools
alternating, --repeats times; kept tiles/s = kept tiles / wall seconds (median run); peak RSS from
wait4. histolab is GridTiler(tile_size=(256, 256), level=0, pixel_overlap=128, check_tissue=True,
tissue_percent=50) run by --histolab-python (default: this interpreter); when that cannot import
histolab its rows are skipped with a message. --before names a checkout of an earlier histosynth
(e.g. `git worktree add /tmp/histosynth-before <commit>`) measured beside this one.

Stages: nuclei_masks and conditioning_maps over the first --stage-patches patches of each slide's
histosynth run, in a fresh process each, with 1 and with --workers processes (and, with --before,
that checkout's code as it was).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HISTOLAB = """
import sys
from histolab.slide import Slide
from histolab.tiler import GridTiler
slide = Slide(sys.argv[1], processed_path=sys.argv[2])
GridTiler(tile_size=(256, 256), level=0, check_tissue=True, tissue_percent=50.0, pixel_overlap=128,
          prefix="", suffix=".png").extract(slide)
"""

STAGES = """
import inspect, json, sys, time
import pandas as pd
from histosynth.config import load_config
from histosynth.data.io import read_patch_index
from histosynth.nuclei.conditioning import build_slide_conditioning
from histosynth.nuclei.stage import segment_slide_patches
slide, index_path, out, count, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
index = read_patch_index(index_path).head(count)
params = load_config()["nuclei"]
def parallel(fn):  # an earlier checkout's stages take no workers
    return {"workers": workers} if "workers" in inspect.signature(fn).parameters else {}
started = time.perf_counter()
table, _ = segment_slide_patches(index, slide, out + "/nuclei", params, progress=False, **parallel(segment_slide_patches))
nuclei = time.perf_counter() - started
table.to_parquet(out + "/nuclei.parquet")
started = time.perf_counter()
build_slide_conditioning(index, out + "/nuclei", pd.read_parquet(out + "/nuclei.parquet"), out + "/conditioning",
                         progress=False, **parallel(build_slide_conditioning))
conditioning = time.perf_counter() - started
print(json.dumps({"patches": len(index), "nuclei_masks": len(index) / nuclei, "conditioning_maps": len(index) / conditioning}))
"""


def timed(command: list[str], env: dict | None, cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process run to completion in `cwd` (not a checkout:
    `python -m` puts its working directory first on the path, before PYTHONPATH)."""
    log = (
        cwd / "child.log"
    )  # a file, not a pipe: nobody reads a pipe until wait4 returns, so a full one would hang the child
    with open(log, "w") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()}")
    return seconds, usage.ru_maxrss / 1024


def checkout_env(checkout: Path | None) -> dict:
    """The environment that runs histosynth from `checkout` (this one when None)."""
    return {**os.environ, "PYTHONPATH": str(Path(checkout or REPO).resolve())}


def histolab_works(python: str) -> bool:
    return subprocess.run([python, "-c", "import histolab"], capture_output=True).returncode == 0


def patch_runs(slide: Path, mpp: float, tools: dict, repeats: int, workdir: Path) -> list[dict]:
    """Alternate the tools on one slide `repeats` times; one row per tool with its median run."""
    runs = {name: [] for name in tools}
    for _ in range(repeats):
        for name, tool in tools.items():
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)
            if tool["kind"] == "histolab":
                command = [tool["python"], "-c", HISTOLAB, str(slide), str(out)]
            else:
                command = [
                    sys.executable,
                    "-m",
                    "histosynth.cli",
                    "patches",
                    str(slide),
                    "--out",
                    str(out),
                    "--name",
                    "s",
                    "--size",
                    "256",
                    "--stride",
                    "128",
                    "--mpp",
                    str(mpp),
                    "--min-tissue",
                    "0.5",
                ]
            seconds, rss = timed(command, tool.get("env"), workdir)
            kept = out.rglob("*.png") if tool["kind"] == "histolab" else (out / "s" / "images").glob("*.png")
            runs[name].append((seconds, rss, len(list(kept))))
    rows = []
    for name, results in runs.items():
        seconds, rss, tiles = sorted(results)[len(results) // 2]
        rows.append(
            {
                "slide": slide.name,
                "tool": name,
                "tiles": tiles,
                "seconds": seconds,
                "tiles_per_s": tiles / seconds,
                "spread_s": f"{min(r[0] for r in results):.2f}-{max(r[0] for r in results):.2f}",
                "peak_rss_mb": rss,
            }
        )
    return rows


def stage_rows(slide: Path, index: Path, count: int, workers: int, before: Path | None, workdir: Path) -> list[dict]:
    """patches/s of nuclei_masks and conditioning_maps on one process and on `workers` (and before)."""
    variants = [("before", before, 1)] if before else []
    variants += [("now, 1 process", None, 1), (f"now, {workers} processes", None, workers)]
    rows = []
    for label, checkout, processes in variants:
        out = workdir / "stages"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        result = subprocess.run(
            [sys.executable, "-c", STAGES, str(slide), str(index), str(out), str(count), str(processes)],
            env=checkout_env(checkout),
            cwd=workdir,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise SystemExit(f"stages ({label}) failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"slide": slide.name, "code": label, **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, action="append", default=[], help="a slide to measure (repeatable)")
    parser.add_argument(
        "--demo-sizes", type=int, nargs="*", default=[8192], help="also demo slides of these level-0 sizes"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("results/bench_throughput"), help="slides and outputs go here"
    )
    parser.add_argument("--histolab-python", default=sys.executable, help="a Python that imports histolab")
    parser.add_argument("--before", type=Path, help="a checkout of an earlier histosynth to measure beside this one")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool and slide (median reported)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes for the stages (default all CPUs)"
    )
    parser.add_argument(
        "--histolab-max-side",
        type=int,
        default=10000,
        help="skip histolab on larger slides (it takes ~100 s per 8k-px slide)",
    )
    parser.add_argument("--stage-patches", type=int, default=300, help="patches per slide for the stage figures")
    args = parser.parse_args()
    from histosynth.data.slides import Slide
    from histosynth.demo import generate_demo_slide

    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = [slide.resolve() for slide in args.slide]
    for size in args.demo_sizes:
        slide = args.workdir / f"demo_{size}.tiff"
        if not slide.exists():
            started = time.perf_counter()
            generate_demo_slide(
                slide,
                args.workdir / f"demo_{size}.geojson",
                args.workdir / f"demo_{size}.nuclei.geojson",
                size=size,
                levels=4,
                seed=size,
                progress=False,
            )
            print(f"generated {slide} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        slides.append(slide)
    tools = {}
    if histolab_works(args.histolab_python):
        tools["histolab"] = {"kind": "histolab", "python": args.histolab_python}
    else:
        print(
            f"histolab: {args.histolab_python} cannot import it (pip install histolab in some venv and pass "
            "--histolab-python); its rows are skipped",
            file=sys.stderr,
        )
    if args.before:
        tools["histosynth before"] = {"kind": "before", "env": checkout_env(args.before)}
    tools["histosynth"] = {"kind": "histosynth", "env": checkout_env(None)}
    patch_table, stage_table = [], []
    for slide in slides:
        with Slide(slide) as opened:
            mpp, side = opened.mpp, max(opened.dimensions)
        work = Path(tempfile.mkdtemp(prefix=f"{slide.stem}.", dir=args.workdir))
        measured = tools
        if side > args.histolab_max_side and "histolab" in tools:
            print(f"histolab: skipped on {slide.name} ({side} px > --histolab-max-side)", file=sys.stderr)
            measured = {name: tool for name, tool in tools.items() if name != "histolab"}
        patch_table += patch_runs(slide, mpp, measured, args.repeats, work)
        stage_table += stage_rows(
            slide, work / "histosynth" / "s.parquet", args.stage_patches, args.workers, args.before, work
        )
        shutil.rmtree(work)
    print(
        f"\npatches: 256 px windows, stride 128, tissue >= 50 %, PNG, level 0; whole processes, median of {args.repeats}"
    )
    print(
        f"{'slide':<28} {'tool':<18} {'tiles':>6} {'seconds':>8} {'range s':>11} {'tiles/s':>8} {'vs histolab':>11} {'peak RSS MB':>11}"
    )
    for row in patch_table:
        reference = next((r for r in patch_table if r["slide"] == row["slide"] and r["tool"] == "histolab"), None)
        ratio = f"{row['tiles_per_s'] / reference['tiles_per_s']:.1f}x" if reference else "-"
        print(
            f"{row['slide']:<28} {row['tool']:<18} {row['tiles']:>6} {row['seconds']:>8.2f} {row['spread_s']:>11} "
            f"{row['tiles_per_s']:>8.1f} {ratio:>11} {row['peak_rss_mb']:>11.0f}"
        )
    print(f"\nstages: patches/s over the first {args.stage_patches} patches of each slide (classical nuclei detector)")
    print(f"{'slide':<28} {'code':<22} {'patches':>7} {'nuclei_masks':>13} {'conditioning_maps':>18}")
    for row in stage_table:
        print(
            f"{row['slide']:<28} {row['code']:<22} {row['patches']:>7} {row['nuclei_masks']:>13.1f} {row['conditioning_maps']:>18.1f}"
        )


if __name__ == "__main__":
    main()
