"""Configuration: the JSON schema (histosynth/schemas, package data; workflow/schemas links to it)
is the single source of defaults and types, for the Snakemake workflow, the standalone `histosynth`
commands and library callers alike (`section_defaults`)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema
import yaml

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CONFIG_SCHEMA = SCHEMA_DIR / "config.schema.yaml"
SLIDES_SCHEMA = SCHEMA_DIR / "slides.schema.yaml"
REPO_ROOT = Path(__file__).resolve().parents[1]  # a checkout's config/ presets (load_preset)


class ConfigError(ValueError):
    """A configuration or slide sheet that does not match the schema."""


def read_yaml(text: str):
    """YAML text as Python objects, through libyaml when PyYAML has it (10x faster than the pure
    Python loader on the schema, which every command reads), with the same safe semantics."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _fill_defaults(validator_class):
    """A validator class that also writes each missing property's schema default (copied) into
    the instance, before validating it, as Snakemake's validate(set_default=True) does."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, schema_properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in schema_properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, schema_properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties})


@functools.cache
def _validator(path: Path, fill: bool):
    schema = read_yaml(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    return (_fill_defaults(cls) if fill else cls)(schema)


def _schema_error(instance, path: Path, fill: bool) -> str | None:
    """The key path and reason of the first schema violation of `instance` (None when valid)."""
    error = jsonschema.exceptions.best_match(_validator(path, fill).iter_errors(instance))
    if error is None:
        return None
    return f"{'.'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"


def validated(config: dict, source: str = "config") -> dict:
    """A copy of `config` checked against the schema, with every default filled in."""
    config = copy.deepcopy(config)
    message = _schema_error(config, CONFIG_SCHEMA, fill=True)
    if message:
        raise ConfigError(f"{source}: {message}\nSee config/README.md for every key, its type and default.")
    _check_class_references(config, source)
    _check_mask_values(config, source)
    _check_evaluation(config, source)
    return config


@functools.cache
def _defaults() -> dict:
    return validated({}, "defaults")


def section_defaults(name: str, overrides: dict | None = None) -> dict:
    """Config section `name` with every schema default (a fresh copy), `overrides` merged in key
    by key and checked against the schema: the settings library callers and tests start from, so
    no default is written twice."""
    section = _merge(copy.deepcopy(_defaults()[name]), copy.deepcopy(overrides or {}))
    message = _schema_error({name: section}, CONFIG_SCHEMA, fill=True)
    if message:
        raise ConfigError(f"{name} settings: {message}")
    return section


def default(key: str):
    """The schema default of top-level key `key` (e.g. weights_dir), for callers given a partial config."""
    return copy.deepcopy(_defaults()[key])


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        base[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def _check_class_references(config: dict, source: str) -> None:
    """Keys that name label classes must name configured ones."""
    classes = config["classes"]
    references = {
        "priority": config["priority"],
        "patches.target_class": [config["patches"]["target_class"]],
        "synthesis.synthesize.target_class": [config["synthesis"]["synthesize"]["target_class"]],
        "synthesis.inpaint.target_class": [config["synthesis"]["inpaint"]["target_class"]],
        "segmentation.classes": config["segmentation"]["classes"] or [],
    }
    for key, names in references.items():
        unknown = [name for name in names if name is not None and name not in classes]
        if unknown:
            raise ConfigError(f"{source}: {key} names {unknown}, which are not in classes {classes}")
    _check_label_references(config, source)


def _check_mask_values(config: dict, source: str) -> None:
    """annotations.mask_values' keys are mask values from 1 (the schema's pattern checks string
    keys only; YAML reads `{0: Tumor}` with an integer key)."""
    bad = [
        key
        for key in config["annotations"]["mask_values"]
        if isinstance(key, bool) or not str(key).isdigit() or int(key) < 1
    ]
    if bad:
        raise ConfigError(
            f"{source}: annotations.mask_values maps {bad}, but its keys are label-mask values from 1 "
            "(0 is background, never a class); renumber or remove them"
        )


def _check_label_references(config: dict, source: str) -> None:
    """diffusion.num_classes and synthesis.synthesize.per_class against the labels, where the config
    alone fixes them (sheet labels without labels.classes are checked once the sheet is read)."""
    labels, regions = config["labels"], [config["labels"]["background"], *config["classes"]]
    known = {
        "region": [regions],
        "sheet": [labels["classes"]] if labels["classes"] else [],
        "auto": [regions, *([labels["classes"]] if labels["classes"] else [])],
    }[labels["source"]]
    if not known or (labels["source"] == "auto" and not labels["classes"]):
        return
    num_classes = config["diffusion"]["num_classes"]
    if num_classes and num_classes not in {len(names) for names in known}:
        raise ConfigError(
            f"{source}: diffusion.num_classes must be 0 (no class embedding) or the number of labels "
            f"({' or '.join(f'{len(n)}: {n}' for n in known)}), got {num_classes}"
        )
    per_class = config["synthesis"]["synthesize"]["per_class"] or {}
    unknown = [name for name in per_class if not any(name in names for names in known)]
    if unknown:
        raise ConfigError(
            f"{source}: synthesis.synthesize.per_class names {unknown}, which are not labels "
            f"({' or '.join(map(str, known))})"
        )


def lora_set(scale: float) -> str:
    """The name of the LoRA set sampled at `scale` (synthesis.lora.scales): lora<scale x 100>, e.g. lora100, lora80."""
    return f"lora{round(100 * float(scale))}"


def _check_evaluation(config: dict, source: str) -> None:
    """Mixing ratios, segmentation shape and report baseline that the schema alone cannot check."""
    names = [ratio["name"] for ratio in config["mixing"]["ratios"]]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{source}: mixing.ratios names must be unique; repeated: {', '.join(repeated)}")
    drawn = {
        *config["mixing"]["sources"],
        *(m for ratio in config["mixing"]["ratios"] for m in ratio.get("sources", [])),
    }
    if "inpaint" in drawn and not config["synthesis"]["inpaint"]["target_class"]:
        raise ConfigError(
            f"{source}: mixing draws from inpaint but synthesis.inpaint.target_class is null; "
            "set the class to paint or drop inpaint from mixing.sources and the ratios' sources"
        )
    if "gan" in drawn and not config["gan"]["enabled"]:
        raise ConfigError(
            f"{source}: mixing draws from gan but gan.enabled is false; enable the GAN or drop gan "
            "from mixing.sources and the ratios' sources"
        )
    lora_sets = {lora_set(scale) for scale in config["synthesis"]["lora"]["scales"]}
    for name in sorted(m for m in drawn if m.startswith("lora")):
        if not config["lora"]["enabled"]:
            raise ConfigError(
                f"{source}: mixing draws from {name} but lora.enabled is false; enable LoRA (and set "
                "lora.base_model) or drop it from mixing.sources and the ratios' sources"
            )
        if name not in lora_sets:
            raise ConfigError(
                f"{source}: mixing draws from {name}, but synthesis.lora.scales {config['synthesis']['lora']['scales']} "
                f"make the sets {sorted(lora_sets)} (lora<scale x 100>)"
            )
    if config["lora"]["enabled"] and not config["lora"]["base_model"]:
        raise ConfigError(
            f"{source}: lora.enabled is true but lora.base_model is null; point it at a local Stable "
            "Diffusion folder in diffusers layout (docs/lora.md)"
        )
    baseline = config["report"]["baseline"]
    if baseline is not None and baseline not in names:
        raise ConfigError(f"{source}: report.baseline {baseline!r} is not one of mixing.ratios {names}")
    seg = config["segmentation"]
    if len(seg["decoder_channels"]) != seg["encoder_depth"]:
        raise ConfigError(
            f"{source}: segmentation.decoder_channels needs one entry per encoder stage "
            f"(encoder_depth = {seg['encoder_depth']}), got {seg['decoder_channels']}"
        )
    if seg["attention"] == "scse" and min(seg["decoder_channels"]) < 16:
        raise ConfigError(
            f"{source}: segmentation.attention scse needs decoder_channels >= 16 (its squeeze divides "
            f"by 16), got {seg['decoder_channels']}; raise them or set attention to null"
        )
    size = config["patches"]["size"]
    if seg["enabled"] and size % 2 ** seg["encoder_depth"]:
        raise ConfigError(
            f"{source}: patches.size {size} is not divisible by 2^segmentation.encoder_depth = "
            f"{2 ** seg['encoder_depth']}; lower segmentation.encoder_depth or change the patch size"
        )


def baseline_ratio(ratios: list[dict], configured: str | None = None) -> str | None:
    """The ratio the report compares against: `configured` (report.baseline), else the first ratio
    with no synthetic images and real ones, else the first ratio."""
    if configured:
        return configured
    names = [ratio["name"] for ratio in ratios]
    return next((r["name"] for r in ratios if not r["synthetic"] and r.get("real", True)), names[0] if names else None)


def load_config(path: str | Path | None = None) -> dict:
    """Read a YAML config (or none, giving all defaults) and validate it."""
    if path is None:
        return validated({}, "defaults")
    path = Path(path)
    try:
        data = read_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from err
    return validated(data, str(path))


def load_preset(name: str) -> dict:
    """The shipped config/config.yaml with config/<name>.yaml layered on top ('demo': none),
    merged as `snakemake --configfile config/config.yaml config/<name>.yaml` merges them."""
    config = read_yaml((REPO_ROOT / "config/config.yaml").read_text())
    if name != "demo":
        preset = REPO_ROOT / "config" / f"{name}.yaml"
        if not preset.is_file():
            raise ConfigError(f"{preset}: no such preset")
        _merge(config, read_yaml(preset.read_text()) or {})
    return validated(config, f"preset {name}")


def config_path(path: str | Path, *folders: str | Path) -> Path:
    """A path the config names (the slide sheet, a base model): as given when absolute; else under the
    first of `folders` that holds it (the working directory, then the workflow's folder), else under
    the last of them."""
    path = Path(path)
    if path.is_absolute():
        return path
    return next((Path(f) / path for f in folders if (Path(f) / path).exists()), Path(folders[-1]) / path)


def read_slide_sheet(path: str | Path) -> pd.DataFrame:
    """Read and validate the slide sheet (TSV): one row per slide with image, annotations, nuclei, split, mpp, label."""
    import pandas as pd

    path = Path(path)
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except (OSError, pd.errors.ParserError) as err:
        raise ConfigError(f"{path}: cannot read the slide sheet ({err})") from err
    for column in ("annotations", "nuclei", "mpp", "label"):
        if column not in sheet:
            sheet[column] = ""
    for line, row in enumerate(sheet.to_dict("records"), start=2):
        message = _schema_error(row, SLIDES_SCHEMA, fill=False)
        if message:
            raise ConfigError(f"{path}, line {line}: {message}")
    duplicated = sheet["slide"][sheet["slide"].duplicated()].tolist()
    if duplicated:
        raise ConfigError(f"{path}: slide names must be unique; repeated: {', '.join(duplicated)}")
    bad_mpp = [m for m in sheet["mpp"] if m and not _is_positive_number(m)]
    if bad_mpp:
        raise ConfigError(f"{path}: column mpp must be empty or a positive number; got {bad_mpp}")
    return sheet.set_index("slide", drop=False)


def _is_positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def key_table() -> str:
    """The markdown table of every config key (type, default, description) that config/README.md
    carries; regenerate it with `python -m histosynth.config` after changing the schema."""
    schema = read_yaml(CONFIG_SCHEMA.read_text())
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(properties: dict, prefix: str) -> None:
        for key, sub in properties.items():
            if sub.get("type") == "object" and "properties" in sub:
                walk(sub["properties"], f"{prefix}{key}.")
                continue
            kind = sub.get("type", "")
            kind = "/".join(kind) if isinstance(kind, list) else kind
            if "enum" in sub:
                kind += " (" + ", ".join(map(str, sub["enum"])) + ")"
            meaning = " ".join(sub.get("description", "").split())
            rows.append(f"| `{prefix}{key}` | {kind} | `{json.dumps(sub.get('default'))}` | {meaning} |")

    walk(schema["properties"], "")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(key_table(), end="")
