"""The `histosynth` commands on a finished run: export a ratio's dataset, query the registry and
generate more images from a registered generator."""

from __future__ import annotations

import json
from pathlib import Path

from histosynth.cli.options import config_for


def cmd_export(args) -> None:
    from histosynth.export import export_run

    registered = Path(args.results) / "registry" / "config.yaml"
    if args.config is None and registered.is_file():
        args.config = registered  # the run's own classes and labels, not today's config/config.yaml
    rows = export_run(args.results, args.ratio, args.format, args.out, config_for(args))
    counts = rows.groupby(["split", "source"]).size()
    print(
        f"{args.out}: {args.format} export of {args.ratio}: "
        + ", ".join(f"{s} {src} {n}" for (s, src), n in counts.items())
    )


def registry_url(args) -> str:
    return args.url or config_for(args)["registry"]["url"]


def print_table(table, as_json: bool) -> None:
    if as_json:
        print(table.to_json(orient="records", default_handler=str))
    elif table.empty:
        print("(none)")
    else:
        print(table.drop(columns=[c for c in ("config", "data") if c in table]).to_string(index=False))


def cmd_registry(args) -> None:
    from histosynth import registry

    engine = registry.connect(registry_url(args), create=False)
    if args.what == "show":
        found = registry.lineage(engine, args.id)
        if args.json:
            print(json.dumps(found, default=str, indent=1))
            return
        model, parent = found["model"], found["parent"]
        print(
            f"model {model['id']}: {model['kind']} {model['path']}\n  hash {model['content_hash'][:16]}, "
            f"{model['steps']} steps, registered {model['registered_at']}"
        )
        if parent:
            print(f"  parent: model {parent['id']} ({parent['kind']} {parent['path']})")
        if model["data"]:
            print(f"  trained on: {json.dumps(model['data'])}")
        for made in found["sets"]:
            kept = next((c["n_kept"] for c in found["curated"] if c["name"] == made["name"]), None)
            print(
                f"  set {made['id']} {made['name']}: {made['n_images']} images ({made['path']}), "
                f"{f'{kept} kept by curation' if kept is not None else 'not curated'}"
            )
            for row in (q for q in found["quality"] if q["set"] == made["name"]):
                print(f"    {row['metric']}: {row['value']:.4g}")
        for dataset in found["datasets"]:
            n_runs = sum(r["ratio"] == dataset["ratio"] for r in found["runs"])
            print(
                f"  dataset {dataset['id']} {dataset['ratio']}: {dataset['n_real']} real + {dataset['n_synthetic']} "
                f"synthetic; {n_runs} task runs"
            )
        for row in found["verdicts"]:
            print(f"    {row['ratio']} {row['metric']} [{row['class']}]: {row['note']}")
        return
    if args.what == "export":
        for path in registry.export(engine, args.out, args.format):
            print(path)
        return
    table = registry.table_rows(engine, args.what, kind=args.kind, label=args.label, history=args.history)
    print_table(table, args.json)


REGISTERED_CONFIG = Path("results/registry/config.yaml")  # the workflow's effective config, written by rule registry


def cmd_generate(args) -> None:
    from histosynth.generate import generate

    if args.config is None and REGISTERED_CONFIG.is_file():
        args.config = REGISTERED_CONFIG
    config = config_for(args)
    manifest = generate(
        registry_url(args),
        args.n,
        args.out,
        config=config,
        model_id=args.model,
        label=args.label,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        scale=args.scale,
    )
    counts = manifest["class"].value_counts().to_dict() if "class" in manifest else {}
    print(
        f"{len(manifest)} images -> {args.out}/ (manifest.parquet, registered as set {Path(args.out).name!r}); per class {counts}"
    )
