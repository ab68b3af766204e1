"""What every `histosynth` command reads: the config (--config, else config/config.yaml in the
working directory when present, else the schema's defaults), and the option parsers."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from histosynth.config import load_config

log = logging.getLogger("histosynth")
DEFAULT_CONFIG = Path("config/config.yaml")


def config_for(args) -> dict:
    """The config a command runs with (--config, else config/config.yaml here, else the schema's defaults)."""
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = load_config(path)
    log.info("defaults from %s", path or "the schema (no config file)")
    return config


def parse_classes(text: str) -> dict[str, int]:
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


def parse_split(text: str) -> dict[str, float]:
    from histosynth.data.sheet import SheetError, parse_split

    try:
        return parse_split(text)
    except SheetError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--split: ")) from err


def parse_regex(text: str):

    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({err})") from err
