"""The `histosynth` command: standalone access to the workflow's stages.

Defaults come from a config file (`--config`, else config/config.yaml in the working directory
when present, else the schema's defaults); options override single keys.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from histosynth.config import load_config, validated

log = logging.getLogger("histosynth")
DEFAULT_CONFIG = Path("config/config.yaml")
IMAGE_SUFFIXES = {".png", ".tif", ".tiff"}


def _config(args) -> dict:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = load_config(path)
    log.info("defaults from %s", path or "the schema (no config file)")
    return config


# The errors a command reports as one line (bad input, with its fix) rather than a traceback, by module:
# looked up among the modules the command imported, so that no command imports another's dependencies.
USER_ERRORS = {
    "histosynth.config": "ConfigError", "histosynth.data.slides": "SlideError",
    "histosynth.data.annotations": "AnnotationError", "histosynth.data.patches": "PatchError",
    "histosynth.nuclei.instances": "NucleiError", "histosynth.data.sheet": "SheetError",
    "histosynth.registry": "RegistryError", "histosynth.export": "ExportError", "histosynth.data.labels": "LabelError",
}


def _user_errors() -> tuple[type[Exception], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


PATCH_SECTIONS = ("run_id", "seed", "annotations", "classes", "priority", "patches")


def _parse_classes(text: str) -> dict[str, int]:
    """'Blood vessel=1,Fat=3' -> {'Blood vessel': 1, 'Fat': 3}."""
    classes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, index = item.rpartition("=")
        if not sep or not name or not index.strip().isdigit() or not 1 <= int(index) <= 255:
            raise argparse.ArgumentTypeError(f"--classes: {item!r} is not NAME=INDEX with INDEX in 1..255")
        classes[name.strip()] = int(index)
    if len(set(classes.values())) != len(classes):
        raise argparse.ArgumentTypeError(f"--classes: indices must be unique, got {classes}")
    return classes


def cmd_inspect(args) -> None:
    from histosynth.data.slides import Slide

    for path in args.slides:
        with Slide(path, mpp=args.slide_mpp, fallback_mpp=args.fallback_mpp, need_mpp=False) as slide:
            info = slide.describe()
        if args.json:
            print(json.dumps(info))
            continue
        print(f"{info['path']}\n  vendor: {info['vendor']}\n  dimensions: {info['dimensions'][0]} x {info['dimensions'][1]} px")
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

    config = _config(args)
    demo = config["demo"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        summary = generate_demo_slide(
            out / f"{name}.tiff", out / f"{name}.geojson", out / f"{name}.nuclei.geojson",
            size=args.size or demo["size"], mpp=demo["mpp"], tile_size=demo["tile_size"], levels=demo["levels"],
            seed=derive_seed(config["seed"], "demo", name), jpeg_quality=demo["jpeg_quality"],
        )
        log.info("%s: %s", name, summary)


def cmd_patches(args) -> None:
    import pyarrow.parquet as pq

    from histosynth.data.patches import class_indices, extract_slide

    # Only the sections this command reads come from the config file (the rest from the schema),
    # so classes given here need not agree with another stage's settings (e.g. diffusion.num_classes).
    loaded = _config(args)
    config = {key: loaded[key] for key in PATCH_SECTIONS if key in loaded}
    overrides = {
        "size": args.size, "stride": args.stride, "mpp": args.mpp, "min_tissue": args.min_tissue,
        "min_label": args.min_label, "target_class": args.target_class,
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
        slide, args.annotations, stem, stem.with_suffix(".parquet"), stem.with_suffix(".qc.png"), slide_name=name,
        split=args.split, config=config, classes=classes, mpp=args.slide_mpp, label=args.label,
    )
    count = pq.read_metadata(index_path).num_rows
    print(f"{count} patches in {stem}/, index {index_path}, QC thumbnail {stem}.qc.png")


def cmd_sheet(args) -> None:
    from histosynth.data.sheet import build_sheet, summary, write_sheet

    sheet = build_sheet(args.folder, split=args.split, seed=args.seed, mpp=args.mpp, annotations_dir=args.annotations_dir,
                        masks_dir=args.masks_dir, nuclei_dir=args.nuclei_dir, absolute=args.absolute, group=args.group)
    if args.out:
        write_sheet(sheet, args.out)
        print(f"{args.out}: {summary(sheet)}")
    else:
        sys.stdout.write(sheet.to_csv(sep="\t", index=False))
        print(summary(sheet), file=sys.stderr)


def _parse_split(text: str) -> dict[str, float]:
    from histosynth.data.sheet import SheetError, parse_split

    try:
        return parse_split(text)
    except SheetError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--split: ")) from err


def _parse_regex(text: str):
    import re

    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({err})") from err


def cmd_nuclei(args) -> None:
    from histosynth.data.io import read_patch_index, write_table
    from histosynth.device import pick_device
    from histosynth.nuclei.instances import NucleiError
    from histosynth.nuclei.model import load_detector
    from histosynth.nuclei.stage import segment_images

    config = _config(args)
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

    config = _config(args)
    params = config["nuclei"]
    if args.steps:
        params["train"]["steps"] = args.steps
    holdout = [s for s in (args.holdout or "").split(",") if s]
    table = train_on_folder(args.images, args.annotations, args.mpp, args.out, params,
                            seed=config["seed"] if args.seed is None else args.seed, holdout=holdout)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for split, rows in table.groupby("split", sort=False):
        print(f"{split}: mean over {len(rows)} images F1@0.5 {rows['f1'].mean():.3f}  AJI {rows['aji'].mean():.3f}  "
              f"PQ {rows['pq'].mean():.3f}  Dice {rows['dice'].mean():.3f}")
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
    print(f"mean over {len(table) - 2} images: F1@{args.iou:g} {mean['f1']:.3f}  AJI {mean['aji']:.3f}  "
          f"PQ {mean['pq']:.3f}  Dice {mean['dice']:.3f}")


def cmd_export(args) -> None:
    from histosynth.export import export_run

    rows = export_run(args.results, args.ratio, args.format, args.out, _config(args))
    counts = rows.groupby(["split", "source"]).size()
    print(f"{args.out}: {args.format} export of {args.ratio}: " + ", ".join(f"{s} {src} {n}" for (s, src), n in counts.items()))


def _registry_url(args) -> str:
    return args.url or _config(args)["registry"]["url"]


def _print_table(table, as_json: bool) -> None:
    if as_json:
        print(table.to_json(orient="records", default_handler=str))
    elif table.empty:
        print("(none)")
    else:
        print(table.drop(columns=[c for c in ("config", "data") if c in table]).to_string(index=False))


def cmd_registry(args) -> None:
    from histosynth import registry

    engine = registry.connect(_registry_url(args), create=False)
    if args.what == "show":
        found = registry.lineage(engine, args.id)
        if args.json:
            print(json.dumps(found, default=str, indent=1))
            return
        model, parent = found["model"], found["parent"]
        print(f"model {model['id']}: {model['kind']} {model['path']}\n  hash {model['content_hash'][:16]}, "
              f"{model['steps']} steps, registered {model['registered_at']}")
        if parent:
            print(f"  parent: model {parent['id']} ({parent['kind']} {parent['path']})")
        if model["data"]:
            print(f"  trained on: {json.dumps(model['data'])}")
        for made in found["sets"]:
            kept = next((c["n_kept"] for c in found["curated"] if c["name"] == made["name"]), None)
            print(f"  set {made['id']} {made['name']}: {made['n_images']} images ({made['path']}), "
                  f"{f'{kept} kept by curation' if kept is not None else 'not curated'}")
            for row in (q for q in found["quality"] if q["set"] == made["name"]):
                print(f"    {row['metric']}: {row['value']:.4g}")
        for dataset in found["datasets"]:
            n_runs = sum(r["ratio"] == dataset["ratio"] for r in found["runs"])
            print(f"  dataset {dataset['id']} {dataset['ratio']}: {dataset['n_real']} real + {dataset['n_synthetic']} "
                  f"synthetic; {n_runs} task runs")
        for row in found["verdicts"]:
            print(f"    {row['ratio']} {row['metric']} [{row['class']}]: {row['note']}")
        return
    if args.what == "export":
        for path in registry.export(engine, args.out, args.format):
            print(path)
        return
    table = registry.table_rows(engine, args.what, kind=args.kind, label=args.label, history=args.history)
    _print_table(table, args.json)


REGISTERED_CONFIG = Path("results/registry/config.yaml")  # the workflow's effective config, written by rule registry


def cmd_generate(args) -> None:
    from histosynth.generate import generate

    if args.config is None and REGISTERED_CONFIG.is_file():
        args.config = REGISTERED_CONFIG
    config = _config(args)
    manifest = generate(_registry_url(args), args.n, args.out, config=config, model_id=args.model, label=args.label,
                        sampler=args.sampler, steps=args.steps, seed=args.seed, scale=args.scale)
    counts = manifest["class"].value_counts().to_dict() if "class" in manifest else {}
    print(f"{len(manifest)} images -> {args.out}/ (manifest.parquet, registered as set {Path(args.out).name!r}); per class {counts}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosynth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print vendor, dimensions, levels, downsamples and mpp of slides")
    p.add_argument("slides", nargs="+", help="slide files: any format OpenSlide reads, a DICOM WSI (a .dcm file or "
                                             "its folder), or a plain PNG/JPEG/TIFF with --slide-mpp")
    p.add_argument("--slide-mpp", type=float, help="microns per pixel of the slides (required for plain images; "
                                                   "overrides what a slide records)")
    p.add_argument("--fallback-mpp", type=float, default=0.5, help="mpp shown when a slide format records none")
    p.add_argument("--json", action="store_true", help="one JSON object per slide")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo-slides", help="generate procedural H&E-like demo slides with GeoJSON annotations")
    p.add_argument("out", help="output folder: <name>.tiff, <name>.geojson, <name>.nuclei.geojson")
    p.add_argument("--names", nargs="+", default=["demo_a"], help="slide names (each gets its own seed)")
    p.add_argument("--size", type=int, help="level-0 edge in pixels (default: config demo.size)")
    p.add_argument("--config", help="config file for defaults")
    p.set_defaults(func=cmd_demo_slides)

    p = sub.add_parser("patches", help="cut one slide into patches, label masks, an index and a QC thumbnail")
    p.add_argument("slide", help="slide file: any format OpenSlide reads, a DICOM WSI (a .dcm file or its folder), "
                                 "or a plain PNG/JPEG/TIFF with --slide-mpp")
    p.add_argument("--annotations", help="region annotations: QuPath GeoJSON, ASAP/Aperio XML or a label mask")
    p.add_argument("--out", required=True, help="output folder: <name>/images, <name>/masks, <name>.parquet, <name>.qc.png")
    p.add_argument("--name", help="slide name in outputs (default: file stem)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split recorded in the index")
    p.add_argument("--config", help="config file for defaults")
    p.add_argument("--size", type=int, help="patch edge in pixels (config patches.size)")
    p.add_argument("--stride", type=int, help="window step in pixels (config patches.stride)")
    p.add_argument("--mpp", type=float, help="target microns per pixel (config patches.mpp)")
    p.add_argument("--slide-mpp", type=float, help="microns per pixel of the slide: overrides what it records; "
                                                   "required for a plain PNG/JPEG/TIFF")
    p.add_argument("--label", help="image-level class written into every index row (the slide sheet's label)")
    p.add_argument("--min-tissue", type=float, help="minimum tissue fraction (config patches.min_tissue)")
    p.add_argument("--min-label", type=float, help="minimum target-class fraction (config patches.min_label)")
    p.add_argument("--target-class", help="class that must reach --min-label (config patches.target_class)")
    p.add_argument("--classes", type=_parse_classes, help="label classes as NAME=INDEX,... (config classes); "
                                                        "their order is the priority unless --priority is given")
    p.add_argument("--priority", help="class names, comma-separated, the winner first where annotations overlap "
                                      "(config priority)")
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser("sheet", help="write a slide sheet (TSV) from a folder of images, split by image",
                       description="Write a slide sheet from an ImageFolder (FOLDER/<class>/<image>: label = the "
                                   "class folder's name) or a flat folder (no label). Images: .png .jpg .jpeg .tif "
                                   ".tiff and slide files (.svs .ndpi .mrxs .scn .dcm ...; a folder of .dcm files is "
                                   "one DICOM WSI). Splits are stratified by label and deterministic given --seed.")
    p.add_argument("folder", help="ImageFolder (one sub-folder per class) or flat folder of images")
    p.add_argument("--mpp", type=float, help="microns per pixel of the images, written to the mpp column "
                                             "(required for plain PNG/JPEG/TIFF; overrides what slide files record)")
    p.add_argument("--split", type=_parse_split, default="train=0.6,val=0.2,test=0.2",
                   help="split fractions, summing to 1 (default train=0.6,val=0.2,test=0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--out", help="sheet path (TSV; default: standard output, the summary on standard error)")
    p.add_argument("--annotations", "--annotations-dir", dest="annotations_dir",
                   help="folder searched for <class>/<name>.<ext>, then <name>.<ext>, per image: QuPath GeoJSON "
                        "(.geojson/.json), ASAP or Aperio XML (.xml)")
    p.add_argument("--masks", dest="masks_dir", help="folder of label-mask images paired the same way (.png/.tif; "
                   "their values' classes in config annotations.mask_values)")
    p.add_argument("--nuclei", dest="nuclei_dir", help="folder of hand-drawn nuclei paired the same way (GeoJSON, "
                   "MoNuSeg/ASAP XML or instance masks): fills the sheet's nuclei column")
    p.add_argument("--group", type=_parse_regex, help="regex whose first capture group on the image name (file stem) "
                                                      "keeps images together in one split, e.g. '^(patient[0-9]+)_'")
    p.add_argument("--absolute", action="store_true", help="write absolute paths (default: relative to the working "
                                                           "directory, as the workflow resolves them)")
    p.set_defaults(func=cmd_sheet)

    p = sub.add_parser("nuclei", help="segment nuclei: uint16 instance masks per image and a per-nucleus table")
    p.add_argument("input", help="a folder of RGB images (PNG/TIFF) or a patch index (.parquet)")
    p.add_argument("--out", required=True, help="output folder: <stem>.png per image and nuclei.parquet")
    p.add_argument("--mpp", type=float, help="microns per pixel of the images (a patch index knows its own)")
    p.add_argument("--model", help="TorchScript detector (config nuclei.model); default: the classical detector")
    p.add_argument("--config", help="config file for defaults (section nuclei)")
    p.set_defaults(func=cmd_nuclei)

    p = sub.add_parser("nuclei-train", help="train a nuclei model (U-Net + watershed) on images with instance annotations")
    p.add_argument("images", help="folder of RGB images (PNG/TIFF/JPEG)")
    p.add_argument("annotations", help="folder of their nuclei: MoNuSeg/Aperio XML or instance masks, <stem>.xml/.png/.tif")
    p.add_argument("--mpp", type=float, required=True, help="microns per pixel of the images")
    p.add_argument("--out", required=True, help="output folder: model.pt (a TorchScript detector), loss.csv, scores.csv, checkpoints/")
    p.add_argument("--holdout", help="comma-separated image stems left out of training and scored apart")
    p.add_argument("--steps", type=int, help="training steps (config nuclei.train.steps)")
    p.add_argument("--seed", type=int, help="seed (config seed)")
    p.add_argument("--config", help="config file for defaults (section nuclei)")
    p.set_defaults(func=cmd_nuclei_train)

    p = sub.add_parser("nuclei-score", help="score predicted nuclei against ground truth: F1 at IoU 0.5, AJI, PQ, pixel Dice")
    p.add_argument("pred", help="folder of predictions: <stem>.png/.tif instance masks (0 = background) or <stem>.xml")
    p.add_argument("truth", help="folder of ground truth: instance masks or MoNuSeg/Aperio XML (<stem>.xml)")
    p.add_argument("--images", help="folder of the images (<stem>.tif/.png), for the size of XML files when no mask gives it")
    p.add_argument("--iou", type=float, default=0.5, help="IoU a match must exceed (default 0.5, the benchmark's)")
    p.add_argument("--out", help="also write the table (.csv, or .parquet)")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.set_defaults(func=cmd_nuclei_score)

    p = sub.add_parser("export", help="write a finished run's mixed dataset (a ratio) as files: segmentation, "
                       "imagefolder or coco (docs/export.md)")
    p.add_argument("ratio", help="the ratio's name (mixing.ratios), e.g. syn24")
    p.add_argument("--format", required=True, choices=["segmentation", "imagefolder", "coco"], help="layout to write")
    p.add_argument("--out", required=True, help="new folder for the dataset (replaced atomically)")
    p.add_argument("--results", default="results", help="the run's results folder (default: results)")
    p.add_argument("--config", help="the run's config, for classes and labels (default config/config.yaml)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("registry", help="query the registry of models, sets, images, runs and metrics (rule registry)")
    p.add_argument("what", choices=["models", "sets", "images", "datasets", "runs", "metrics", "show", "export"],
                   help="a table to list, `show ID` (a model's lineage) or `export`")
    p.add_argument("id", nargs="?", type=int, help="with show: the model id")
    p.add_argument("--kind", help="only rows of this kind (models: diffusion, gan, lora, segmentation, classifier, ...)")
    p.add_argument("--class", dest="label", help="images: only this class")
    p.add_argument("--history", action="store_true", help="also rows whose files were since replaced")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv", help="export: file format")
    p.add_argument("--out", default="registry-export", help="export: output folder")
    p.add_argument("--url", help="registry URL (default: registry.url of the config)")
    p.add_argument("--config", help="config file (default config/config.yaml)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("generate", help="N more images from a registered generator (default: the newest diffusion model)")
    p.add_argument("n", type=int, help="images to make")
    p.add_argument("--model", type=int, help="registry id of a diffusion, GAN or LoRA model (histosynth registry models)")
    p.add_argument("--class", dest="label", help="a region class (diffusion: maps containing it) or a label")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver++"], help="diffusion sampler (default: the config's)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the config's)")
    p.add_argument("--seed", type=int, help="master seed (default: the config's; the workflow's reproduces its images)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA weight (LoRA models)")
    p.add_argument("--out", required=True, help="new folder for the set")
    p.add_argument("--url", help="registry URL (default: registry.url of the config)")
    p.add_argument("--config", help=f"the workflow's config (default {REGISTERED_CONFIG}, as rule registry wrote it)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except Exception as err:
        if not isinstance(err, (OSError, *_user_errors())):
            raise
        log.debug("the error's traceback", exc_info=True)
        print(f"histosynth {args.command}: error: {_os_error(err) if isinstance(err, OSError) else err}", file=sys.stderr)
        return 2
    return 0


OS_FIXES = {  # what to do about a failed read or write, by errno
    errno.ENOSPC: "free space on that disk or write elsewhere with --out",
    errno.EDQUOT: "free space within your quota or write elsewhere with --out",
    errno.EACCES: "make it readable/writable for you or use another folder",
    errno.EPERM: "make it readable/writable for you or use another folder",
    errno.EROFS: "a read-only file system: write elsewhere with --out",
    errno.ENOENT: "check the path",
}


def _os_error(err: OSError) -> str:
    """A failed read or write as one line: the path, what the system said and what to do; outputs
    are written atomically, so nothing is left half-written."""
    path = f"{err.filename}: " if err.filename else ""
    fix = OS_FIXES.get(err.errno, "check the path and the disk")
    return f"{path}{err.strerror or err} ({fix}); nothing was left half-written"


if __name__ == "__main__":
    sys.exit(main())
