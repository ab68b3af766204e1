"""The `histosynth` command: standalone access to the workflow's stages.

Defaults come from a config file (`--config`, else config/config.yaml in the working directory
when present, else the schema's defaults); options override single keys.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from histosynth.cli.options import parse_classes, parse_regex, parse_split
from histosynth.cli.runs import REGISTERED_CONFIG, cmd_export, cmd_generate, cmd_registry
from histosynth.cli.stages import (
    cmd_demo_slides,
    cmd_inspect,
    cmd_nuclei,
    cmd_nuclei_score,
    cmd_nuclei_train,
    cmd_patches,
    cmd_sheet,
)

log = logging.getLogger("histosynth")


# The errors a command reports as one line (bad input, with its fix) rather than a traceback, by module:
# looked up among the modules the command imported, so that no command imports another's dependencies.
USER_ERRORS = {
    "histosynth.config": "ConfigError",
    "histosynth.data.slides": "SlideError",
    "histosynth.data.annotations": "AnnotationError",
    "histosynth.data.patches": "PatchError",
    "histosynth.nuclei.instances": "NucleiError",
    "histosynth.data.sheet": "SheetError",
    "histosynth.registry": "RegistryError",
    "histosynth.export": "ExportError",
    "histosynth.data.labels": "LabelError",
    "histosynth.training.errors": "TrainingError",  # nuclei-train: e.g. a checkpoint made with other settings
}


def _user_errors() -> tuple[type[Exception], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histosynth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print vendor, dimensions, levels, downsamples and mpp of slides")
    p.add_argument(
        "slides",
        nargs="+",
        help="slide files: any format OpenSlide reads, a DICOM WSI (a .dcm file or "
        "its folder), or a plain PNG/JPEG/TIFF",
    )
    p.add_argument(
        "--slide-mpp",
        type=float,
        help="microns per pixel of the slides (overrides what a slide records; "
        "a plain image without it shows mpp: unknown)",
    )
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
    p.add_argument(
        "slide",
        help="slide file: any format OpenSlide reads, a DICOM WSI (a .dcm file or its folder), "
        "or a plain PNG/JPEG/TIFF with --slide-mpp",
    )
    p.add_argument("--annotations", help="region annotations: QuPath GeoJSON, ASAP/Aperio XML or a label mask")
    p.add_argument(
        "--out", required=True, help="output folder: <name>/images, <name>/masks, <name>.parquet, <name>.qc.png"
    )
    p.add_argument("--name", help="slide name in outputs (default: file stem)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split recorded in the index")
    p.add_argument("--config", help="config file for defaults")
    p.add_argument("--size", type=int, help="patch edge in pixels (config patches.size)")
    p.add_argument("--stride", type=int, help="window step in pixels (config patches.stride)")
    p.add_argument("--mpp", type=float, help="target microns per pixel (config patches.mpp)")
    p.add_argument(
        "--slide-mpp",
        type=float,
        help="microns per pixel of the slide: overrides what it records; required for a plain PNG/JPEG/TIFF",
    )
    p.add_argument("--label", help="image-level class written into every index row (the slide sheet's label)")
    p.add_argument("--min-tissue", type=float, help="minimum tissue fraction (config patches.min_tissue)")
    p.add_argument("--min-label", type=float, help="minimum target-class fraction (config patches.min_label)")
    p.add_argument("--target-class", help="class that must reach --min-label (config patches.target_class)")
    p.add_argument(
        "--classes",
        type=parse_classes,
        help="label classes as NAME=INDEX,... (config classes); their order is the priority unless --priority is given",
    )
    p.add_argument(
        "--priority", help="class names, comma-separated, the winner first where annotations overlap (config priority)"
    )
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser(
        "sheet",
        help="write a slide sheet (TSV) from a folder of images, split by image",
        description="Write a slide sheet from an ImageFolder (FOLDER/<class>/<image>: label = the "
        "class folder's name) or a flat folder (no label). Images: .png .jpg .jpeg .tif "
        ".tiff and slide files (.svs .ndpi .mrxs .scn .dcm ...; a folder of .dcm files is "
        "one DICOM WSI). Splits are stratified by label and deterministic given --seed.",
    )
    p.add_argument("folder", help="ImageFolder (one sub-folder per class) or flat folder of images")
    p.add_argument(
        "--mpp",
        type=float,
        help="microns per pixel of the images, written to the mpp column "
        "(required for plain PNG/JPEG/TIFF; overrides what slide files record)",
    )
    p.add_argument(
        "--split",
        type=parse_split,
        default="train=0.6,val=0.2,test=0.2",
        help="split fractions, summing to 1 (default train=0.6,val=0.2,test=0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--out", help="sheet path (TSV; default: standard output, the summary on standard error)")
    p.add_argument(
        "--annotations",
        "--annotations-dir",
        dest="annotations_dir",
        help="folder searched for <class>/<name>.<ext>, then <name>.<ext>, per image: QuPath GeoJSON "
        "(.geojson/.json), ASAP or Aperio XML (.xml)",
    )
    p.add_argument(
        "--masks",
        dest="masks_dir",
        help="folder of label-mask images paired the same way (.png/.tif; "
        "their values' classes in config annotations.mask_values)",
    )
    p.add_argument(
        "--nuclei",
        dest="nuclei_dir",
        help="folder of hand-drawn nuclei paired the same way (GeoJSON, "
        "MoNuSeg/ASAP XML or instance masks): fills the sheet's nuclei column",
    )
    p.add_argument(
        "--group",
        type=parse_regex,
        help="regex whose first capture group on the image name (file stem) "
        "keeps images together in one split, e.g. '^(patient[0-9]+)_'",
    )
    p.add_argument(
        "--absolute",
        action="store_true",
        help="write absolute paths (default: relative to the working directory, as the workflow resolves them)",
    )
    p.set_defaults(func=cmd_sheet)

    p = sub.add_parser("nuclei", help="segment nuclei: uint16 instance masks per image and a per-nucleus table")
    p.add_argument("input", help="a folder of RGB images (PNG/TIFF) or a patch index (.parquet)")
    p.add_argument("--out", required=True, help="output folder: <stem>.png per image and nuclei.parquet")
    p.add_argument("--mpp", type=float, help="microns per pixel of the images (a patch index knows its own)")
    p.add_argument("--model", help="TorchScript detector (config nuclei.model); default: the classical detector")
    p.add_argument("--config", help="config file for defaults (section nuclei)")
    p.set_defaults(func=cmd_nuclei)

    p = sub.add_parser(
        "nuclei-train", help="train a nuclei model (U-Net + watershed) on images with instance annotations"
    )
    p.add_argument("images", help="folder of RGB images (PNG/TIFF/JPEG)")
    p.add_argument(
        "annotations",
        help="folder of their nuclei, <stem>.<ext>: instance masks (.png/.tif), MoNuSeg/Aperio "
        "or ASAP XML (.xml) or GeoJSON (.geojson/.json)",
    )
    p.add_argument("--mpp", type=float, required=True, help="microns per pixel of the images")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: model.pt (a TorchScript detector), loss.csv, scores.csv, checkpoints/",
    )
    p.add_argument("--holdout", help="comma-separated image stems left out of training and scored apart")
    p.add_argument("--steps", type=int, help="training steps (config nuclei.train.steps)")
    p.add_argument("--seed", type=int, help="seed (config seed)")
    p.add_argument("--config", help="config file for defaults (section nuclei)")
    p.set_defaults(func=cmd_nuclei_train)

    p = sub.add_parser(
        "nuclei-score", help="score predicted nuclei against ground truth: F1 at IoU 0.5, AJI, PQ, pixel Dice"
    )
    p.add_argument(
        "pred",
        help="folder of predictions, <stem>.<ext>: instance masks (.png/.tif, 0 = background), "
        "MoNuSeg/Aperio or ASAP XML (.xml) or GeoJSON (.geojson/.json)",
    )
    p.add_argument("truth", help="folder of ground truth in the same formats")
    p.add_argument(
        "--images",
        help="folder of the images (<stem>.tif/.png), for the size of XML/GeoJSON files when no mask gives it",
    )
    p.add_argument("--iou", type=float, default=0.5, help="IoU a match must exceed (default 0.5, the benchmark's)")
    p.add_argument("--out", help="also write the table (.csv, or .parquet)")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.set_defaults(func=cmd_nuclei_score)

    p = sub.add_parser(
        "export",
        help="write a finished run's mixed dataset (a ratio) as files: segmentation, "
        "imagefolder or coco (docs/export.md)",
    )
    p.add_argument("ratio", help="the ratio's name (mixing.ratios), e.g. syn24")
    p.add_argument("--format", required=True, choices=["segmentation", "imagefolder", "coco"], help="layout to write")
    p.add_argument("--out", required=True, help="new folder for the dataset (replaced atomically)")
    p.add_argument("--results", default="results", help="the run's results folder (default: results)")
    p.add_argument(
        "--config",
        help="the run's config, for classes and labels (default: RESULTS/registry/config.yaml, the run's "
        "effective config, else config/config.yaml)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("registry", help="query the registry of models, sets, images, runs and metrics (rule registry)")
    p.add_argument(
        "what",
        choices=["models", "sets", "images", "datasets", "runs", "metrics", "show", "export"],
        help="a table to list, `show ID` (a model's lineage) or `export`",
    )
    p.add_argument("id", nargs="?", type=int, help="with show: the model id")
    p.add_argument(
        "--kind", help="only rows of this kind (models: diffusion, gan, lora, segmentation, classifier, ...)"
    )
    p.add_argument("--class", dest="label", help="images: only this class")
    p.add_argument("--history", action="store_true", help="also rows whose files were since replaced")
    p.add_argument("--json", action="store_true", help="JSON records instead of a table")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv", help="export: file format")
    p.add_argument("--out", default="registry-export", help="export: output folder")
    p.add_argument("--url", help="registry URL (default: registry.url of the config)")
    p.add_argument("--config", help="config file (default config/config.yaml)")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser(
        "generate", help="N more images from a registered generator (default: the newest diffusion model)"
    )
    p.add_argument("n", type=int, help="images to make")
    p.add_argument(
        "--model", type=int, help="registry id of a diffusion, GAN or LoRA model (histosynth registry models)"
    )
    p.add_argument("--class", dest="label", help="a region class (diffusion: maps containing it) or a label")
    p.add_argument(
        "--sampler", choices=["ddpm", "ddim", "dpmsolver++"], help="diffusion sampler (default: the config's)"
    )
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except Exception as err:
        if not isinstance(err, (OSError, *_user_errors())):
            raise
        log.debug("the error's traceback", exc_info=True)
        print(
            f"histosynth {args.command}: error: {_os_error(err) if isinstance(err, OSError) else err}", file=sys.stderr
        )
        return 2
    return 0


OS_FIXES = {  # what to do about a failed read or write, by errno
    errno.ENOSPC: "free space on that disk or write to another folder",
    errno.EDQUOT: "free space within your quota or write to another folder",
    errno.EACCES: "make it readable/writable for you or use another folder",
    errno.EPERM: "make it readable/writable for you or use another folder",
    errno.EROFS: "a read-only file system: write to another folder",
    errno.ENOENT: "check the path",
}


def _os_error(err: OSError) -> str:
    """A failed read or write as one line: the path, what the system said and what to do; outputs
    are written atomically, so nothing is left half-written."""
    path = f"{err.filename}: " if err.filename else ""
    fix = OS_FIXES.get(err.errno, "check the path and the disk")
    return f"{path}{err.strerror or err} ({fix}); nothing was left half-written"
