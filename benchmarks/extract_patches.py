"""Benchmark (not a test): patch-extraction throughput and peak memory on demo slides of two
sizes, to show that memory stays flat as slides grow.

    .venv/bin/python benchmarks/extract_patches.py --sizes 8192 32768 --workdir /tmp/hs-bench

Each extraction runs in a fresh process; its peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import pyarrow.parquet as pq
from histosynth.config import load_config
from histosynth.data.patches import extract_slide
image, annotations, out = sys.argv[1:4]
started = time.perf_counter()
from pathlib import Path
index = extract_slide(image, annotations, Path(out) / "bench", Path(out) / "bench.parquet", slide_name="bench", split="train",
                      config=load_config(), progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"patches": pq.read_metadata(index).num_rows, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768], help="level-0 edge of each demo slide")
    parser.add_argument("--workdir", type=Path, default=Path("results/bench_extract"), help="where slides and patches go")
    args = parser.parse_args()
    from histosynth.demo import generate_demo_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        slide = args.workdir / f"demo_{size}.tiff"
        regions = args.workdir / f"demo_{size}.geojson"
        if not slide.exists():
            started = time.perf_counter()
            generate_demo_slide(slide, regions, args.workdir / f"demo_{size}.nuclei.geojson", size=size, levels=4, seed=size)
            print(f"generated {slide} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        out = args.workdir / f"patches_{size}"
        result = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(regions), str(out)],
                                check=True, capture_output=True, text=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"size": size, **figures})
    print(f"{'slide px':>10} {'patches':>8} {'seconds':>8} {'patches/s':>10} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['size']:>10} {row['patches']:>8} {row['seconds']:>8.1f} {row['patches'] / row['seconds']:>10.1f} {row['peak_rss_mb']:>12.0f}")
    if len(rows) > 1:
        low, high = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
        print(f"peak RSS change from {rows[0]['size']} to {rows[-1]['size']} px: {100 * (high - low) / low:+.1f}%")


if __name__ == "__main__":
    main()
