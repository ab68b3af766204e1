"""The `histosynth` commands that run one stage on files outside the workflow: inspect, demo-slides,
patches, sheet, nuclei, nuclei-train and nuclei-score."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from histosynth.cli.options import config_for
from histosynth.config import validated

log = logging.getLogger("histosynth")
IMAGE_SUFFIXES = {".png", ".tif", ".tiff"}
PATCH_SECTIONS = ("run_id", "seed", "annotations", "classes", "priority", "patches")


def cmd_inspect(args) -> None:
    from histosynth.data.slides import Slide

    for path in args.slides:
        with Slide(path, mpp=args.slide_mpp, fallback_mpp=args.fallback_mpp, need_mpp=False) as slide:
            info = slide.describe()
        if args.json:
            print(json.dumps(info))
            continue
        print(
            f"{info['path']}\n  vendor: {info['vendor']}\n  dimensions: {info['dimensions'][0]} x {info['dimensions'][1]} px"
        )
        mpp = f"{info['mpp']:.4f}" if info["mpp"] else "unknown (give --slide-mpp or the sheet's mpp)"
        print(f"  mpp: {mpp}   objective: {info['objective_power'] or 'unknown'}")
        for level in info["levels"]:
            w, h = level["dimensions"]
            at = f", {level['mpp']:.3f} mpp" if level["mpp"] else ""
            print(f"  level {level['level']}: {w} x {h} px, downsample {level['downsample']:.3f}{at}")
        print(f"  associated images: {', '.join(info['associated_images']) or 'none'}")


def cmd_demo_slides(args) -> None:
    from histosynth.demo import generate_demo_slide
    from histosynth.seeds import derive_seed

    config = config_for(args)
    demo = config["demo"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        summary = generate_demo_slide(
            out / f"{name}.tiff",
            out / f"{name}.geojson",
            out / f"{name}.nuclei.geojson",
            size=args.size or demo["size"],
            mpp=demo["mpp"],
            tile_size=demo["tile_size"],
            levels=demo["levels"],
            seed=derive_seed(config["seed"], "demo", name),
            jpeg_quality=demo["jpeg_quality"],
        )
        log.info("%s: %s", name, summary)


def cmd_patches(args) -> None:
    import pyarrow.parquet as pq

    from histosynth.data.patches import class_indices, extract_slide

    # Only the sections this command reads come from the config file (the rest from the schema),
    # so classes given here need not agree with another stage's settings (e.g. diffusion.num_classes).
    loaded = config_for(args)
    config = {key: loaded[key] for key in PATCH_SECTIONS if key in loaded}
    overrides = {
        "size": args.size,
        "stride": args.stride,
        "mpp": args.mpp,
        "min_tissue": args.min_tissue,
        "min_label": args.min_label,
        "target_class": args.target_class,
    }
    config["patches"].update({k: v for k, v in overrides.items() if v is not None})
    if args.classes is not None:  # classes on the command line bring their own priority
        config["classes"] = sorted(args.classes, key=args.classes.get)
        config["priority"] = list(args.classes)
    if args.priority is not None:
        config["priority"] = [name.strip() for name in args.priority.split(",") if name.strip()]
    config = validated(config, "command-line options")
    classes = args.classes or class_indices(config["classes"])
    slide = Path(args.slide)
    name = args.name or slide.stem
    stem = Path(args.out) / name
    index_path = extract_slide(
        slide,
        args.annotations,
        stem,
        stem.with_suffix(".parquet"),
        stem.with_suffix(".qc.png"),
        slide_name=name,
        split=args.split,
        config=config,
        classes=classes,
        mpp=args.slide_mpp,
        label=args.label,
    )
    count = pq.read_metadata(index_path).num_rows
    print(f"{count} patches in {stem}/, index {index_path}, QC thumbnail {stem}.qc.png")


def cmd_sheet(args) -> None:
    from histosynth.data.sheet import build_sheet, summary, write_sheet

    sheet = build_sheet(
        args.folder,
        split=args.split,
        seed=args.seed,
        mpp=args.mpp,
        annotations_dir=args.annotations_dir,
        masks_dir=args.masks_dir,
        nuclei_dir=args.nuclei_dir,
        absolute=args.absolute,
        group=args.group,
    )
    if args.out:
        write_sheet(sheet, args.out)
        print(f"{args.out}: {summary(sheet)}")
    else:
        sys.stdout.write(sheet.to_csv(sep="\t", index=False))
        print(summary(sheet), file=sys.stderr)


def cmd_nuclei(args) -> None:
    from histosynth.data.io import read_patch_index, write_table
    from histosynth.device import pick_device
    from histosynth.nuclei.instances import NucleiError
    from histosynth.nuclei.model import load_detector
    from histosynth.nuclei.stage import segment_images

    config = config_for(args)
    if args.model:
        config["nuclei"]["model"] = args.model
    params = config["nuclei"]
    source = Path(args.input)
    if source.suffix == ".parquet":
        index = read_patch_index(source)
        paths, mpp = index["image"].tolist(), args.mpp or float(index["mpp"].iloc[0])
    elif source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if args.mpp is None:
            raise NucleiError(f"{source}: give the images' resolution with --mpp (microns per pixel)")
        mpp = args.mpp
    else:
        raise NucleiError(f"{source}: expected a folder of PNG/TIFF images or a patch index (.parquet)")
    model = load_detector(params["model"], str(pick_device())) if params["model"] else None
    table = segment_images(paths, mpp, args.out, params, model)
    write_table(table, Path(args.out) / "nuclei.parquet")
    print(f"{len(table)} nuclei in {len(paths)} images -> {args.out}/<stem>.png, {args.out}/nuclei.parquet")


def cmd_nuclei_train(args) -> None:
    from histosynth.nuclei.learned import train_on_folder

    config = config_for(args)
    params = config["nuclei"]
    if args.steps:
        params["train"]["steps"] = args.steps
    holdout = [s for s in (args.holdout or "").split(",") if s]
    table = train_on_folder(
        args.images,
        args.annotations,
        args.mpp,
        args.out,
        params,
        seed=config["seed"] if args.seed is None else args.seed,
        holdout=holdout,
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for split, rows in table.groupby("split", sort=False):
        print(
            f"{split}: mean over {len(rows)} images F1@0.5 {rows['f1'].mean():.3f}  AJI {rows['aji'].mean():.3f}  "
            f"PQ {rows['pq'].mean():.3f}  Dice {rows['dice'].mean():.3f}"
        )
    print(f"model -> {Path(args.out) / 'model.pt'} (use: histosynth nuclei IMAGES --mpp M --model {args.out})")


def cmd_nuclei_score(args) -> None:
    from histosynth.data.io import write_csv, write_table
    from histosynth.nuclei.metrics import score_folders

    table = score_folders(args.pred, args.truth, args.images, args.iou)
    if args.out:
        out = Path(args.out)
        (write_table if out.suffix == ".parquet" else write_csv)(table, out)
    if args.json:
        print(table.to_json(orient="records"))
        return
    shown = table[["image", "truth", "pred", "precision", "recall", "f1", "aji", "pq", "dq", "sq", "dice"]].copy()
    shown[["truth", "pred"]] = shown[["truth", "pred"]].astype("string").fillna("")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""))
    mean = table.set_index("image").loc["mean"]
    print(
        f"mean over {len(table) - 2} images: F1@{args.iou:g} {mean['f1']:.3f}  AJI {mean['aji']:.3f}  "
        f"PQ {mean['pq']:.3f}  Dice {mean['dice']:.3f}"
    )
