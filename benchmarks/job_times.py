"""Benchmark (not a test): where a finished run's time went, from the per-job files Snakemake's
`benchmark:` directives write (results/benchmarks/<rule>/...tsv): per rule the jobs, their summed
and longest wall time and peak memory, longest first, and the sum over every job.

    .venv/bin/python benchmarks/job_times.py                 # results/benchmarks of the run here
    .venv/bin/python benchmarks/job_times.py RUN/results/benchmarks --csv times.csv

The summed job time exceeds the DAG's wall time where jobs ran side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def job_times(folder: str | Path) -> pd.DataFrame:
    """One row per job: rule (the first folder under `folder`, or the file's stem), file, seconds, max RSS in MB."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        rule = path.relative_to(folder).parts[0].removesuffix(".tsv")
        rows.append(
            {
                "rule": rule,
                "file": str(path.relative_to(folder)),
                "s": float(table["s"].iloc[-1]),
                "max_rss_mb": float(pd.to_numeric(table["max_rss"], errors="coerce").iloc[-1]),
            }
        )
    if not rows:
        raise SystemExit(f"{folder}: no benchmark files (*.tsv); run the workflow first")
    return pd.DataFrame(rows)


def per_rule(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs, summed and longest seconds and peak memory per rule, the costliest first, with a total row."""
    table = jobs.groupby("rule").agg(
        jobs=("s", "size"), total_s=("s", "sum"), longest_s=("s", "max"), max_rss_mb=("max_rss_mb", "max")
    )
    table = table.sort_values("total_s", ascending=False)
    table.loc["all jobs"] = [
        table["jobs"].sum(),
        table["total_s"].sum(),
        table["longest_s"].max(),
        table["max_rss_mb"].max(),
    ]
    return table.round(1)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="results/benchmarks")
    parser.add_argument("--csv", help="also write the per-rule table here")
    args = parser.parse_args(argv)
    table = per_rule(job_times(args.folder))
    print(table.to_string())
    if args.csv:
        table.to_csv(args.csv)
    return table


if __name__ == "__main__":
    main()
