"""A learned nuclei detector behind a TorchScript file, run in overlapping tiles and stitched: a
released HD-Yolo file (histosynth.nuclei.hdyolo) or any model honouring histosynth's own contract
(see `load_detector`)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.color import rgb2hed

from histosynth.files import MODEL_INFO  # the extra file of a TorchScript model trained here (nuclei.learned)
from histosynth.nuclei.hdyolo import detect_hdyolo, is_hdyolo, prepare_hdyolo
from histosynth.nuclei.instances import NUCLEUS_CLASSES, NucleiError, mean_per_instance, renumber, shape_table

# Input sides of a learned model are rounded up to a multiple of this (detection networks' stride).
MODEL_STRIDE = 32
# The nuclei settings a learned detector reads (here and in histosynth.nuclei.hdyolo); the others
# but `train` are the classical detector's (see histosynth.nuclei.stage.detector_settings).
MODEL_SETTINGS = ("model", "model_mpp", "model_classes", "tile", "pad")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NucleiModel:
    """A loaded TorchScript nuclei detector and the device it runs on."""

    path: Path
    module: object  # a torch.jit.ScriptModule; torch is imported only when a model is used
    device: str
    kind: str  # "hdyolo" (histosynth.nuclei.hdyolo) or "contract" (load_detector's docstring)
    mpp: float | None = None  # the resolution the file declares (a model trained here), else nuclei.model_mpp


def load_detector(path: str | Path, device: str = "cpu", nms_params: Mapping | None = None) -> NucleiModel:
    """Load a TorchScript nuclei detector onto `device`, in either of two forms.

    A released HD-Yolo file (e.g. lung_best.float16.torchscript.pt, told apart by its
    headers.det.nms_params) runs as histosynth.nuclei.hdyolo describes; `nms_params` overrides
    its NMS settings (conf_thres, iou_thres, max_det).

    Histosynth's own contract: the module takes a float tensor (1, 3, H, W), RGB in [0, 1] at
    nuclei.model_mpp, H and W multiples of 32, and returns a tuple (instances, classes, scores):
    `instances` an (H, W) integer tensor with ids 1..N (0 = none), `classes` a list of N
    class-name strings (the class of instance i at position i - 1) and `scores` N floats. Class
    names that are not NUCLEUS_CLASSES must be mapped by nuclei.model_classes. A model trained
    here (histosynth.nuclei.learned; `path` may be its training folder, holding model.pt) follows
    this contract and declares its own mpp.
    """
    import torch
    import torchvision  # noqa: F401  registers the nms and roi_align ops HD-Yolo graphs call; needed before loading

    path = Path(path)
    if path.is_dir() and (path / "model.pt").is_file():
        path = path / "model.pt"
    if not path.is_file():
        raise NucleiError(
            f"{path}: no such nuclei model file; set nuclei.model to a TorchScript file, or to null for the classical detector"
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # TorchScript is deprecated upstream but still the format that carries class names
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            extra = {MODEL_INFO: ""}
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as err:
        raise NucleiError(
            f"{path}: not a TorchScript module ({str(err).splitlines()[0]}); export the detector with "
            "torch.jit.script(model).save(path) or torch.jit.trace(model, example).save(path)"
        ) from err
    if is_hdyolo(module):
        return NucleiModel(path, prepare_hdyolo(module, device, path, nms_params), device, "hdyolo")
    if not _follows_contract(module):
        raise NucleiError(
            f"{path}: a TorchScript module but neither an HD-Yolo file (no headers.det.nms_params) nor histosynth's "
            f"contract (forward(x) returning (instances, classes, scores)); its forward is {module.forward.schema}. "
            "Both forms are described in histosynth.nuclei.model.load_detector"
        )
    if nms_params:
        raise NucleiError(f"{path}: nms_params apply to HD-Yolo files only; this model follows histosynth's contract")
    module.to(device).eval()
    declared = json.loads(extra[MODEL_INFO]) if extra[MODEL_INFO] else {}
    return NucleiModel(path, module, device, "contract", declared.get("mpp"))


def _follows_contract(module) -> bool:
    """Whether forward takes one tensor (further arguments defaulted) and returns a 3-tuple."""
    import torch

    schema = module.forward.schema
    arguments = schema.arguments[1:]  # after self
    returns = schema.returns
    takes_a_tensor = bool(arguments) and isinstance(arguments[0].type, torch.TensorType)
    returns_three = (
        len(returns) == 1 and isinstance(returns[0].type, torch.TupleType) and len(returns[0].type.elements()) == 3
    )
    return takes_a_tensor and all(a.has_default_value() for a in arguments[1:]) and returns_three


def detect_with_model(rgb: np.ndarray, model: NucleiModel, params: Mapping) -> tuple[np.ndarray, pd.DataFrame]:
    """Run a learned detector on an RGB uint8 image at params["model_mpp"], in tiles of
    params["tile"] pixels with params["pad"] pixels of context on each side (both rounded up to
    multiples of 32; white beyond the image). A tile keeps the instances whose centroid lies in
    its core; where kept instances of neighbouring tiles overlap, the earlier tile's pixels stay.
    An HD-Yolo model runs through histosynth.nuclei.hdyolo.detect_hdyolo instead."""
    if model.kind == "hdyolo":
        return detect_hdyolo(rgb, model.module, params, model.path)
    h, w = rgb.shape[:2]
    tile = _round_up(params["tile"], MODEL_STRIDE)
    core_h, core_w = min(tile, _round_up(h, MODEL_STRIDE)), min(tile, _round_up(w, MODEL_STRIDE))
    pad = _round_up(params["pad"], MODEL_STRIDE)
    n_rows, n_cols = math.ceil(h / core_h), math.ceil(w / core_w)
    canvas = np.full((n_rows * core_h + 2 * pad, n_cols * core_w + 2 * pad, 3), 255, np.uint8)
    canvas[pad : pad + h, pad : pad + w] = rgb
    instances = np.zeros((h, w), np.int32)
    classes: list[str] = []
    scores: list[float] = []
    for top in range(0, n_rows * core_h, core_h):
        for left in range(0, n_cols * core_w, core_w):
            window = canvas[top : top + core_h + 2 * pad, left : left + core_w + 2 * pad]
            tile_instances, tile_classes, tile_scores = _run_model(model, window)
            cy, cx = _centroids(tile_instances, len(tile_classes))
            kept = np.flatnonzero((cy >= pad) & (cy < pad + core_h) & (cx >= pad) & (cx < pad + core_w))
            lut = np.zeros(len(tile_classes) + 1, np.int32)
            lut[kept + 1] = len(classes) + np.arange(1, len(kept) + 1)
            classes += _map_classes([tile_classes[i] for i in kept], params, model.path)
            scores += [tile_scores[i] for i in kept]
            # The window covers image rows top - pad .. top + core_h + pad: paste its in-image part.
            r0, c0 = max(top - pad, 0), max(left - pad, 0)
            r1, c1 = min(top + core_h + pad, h), min(left + core_w + pad, w)
            mapped = lut[tile_instances[r0 - top + pad : r1 - top + pad, c0 - left + pad : c1 - left + pad]]
            target = instances[r0:r1, c0:c1]
            np.copyto(target, mapped, where=(mapped > 0) & (target == 0))
    table = shape_table(instances)
    if table.empty:
        return instances.astype(np.uint16), table
    positions = table["instance_id"].to_numpy() - 1
    table["class"] = [classes[i] for i in positions]
    table["score"] = np.asarray(scores, np.float64)[positions]
    table["hematoxylin"] = mean_per_instance(instances, rgb2hed(rgb)[..., 0], table["instance_id"])
    return renumber(instances, table)  # stitching drops the ids whose pixels a neighbour took


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centroids of labels 1..n (NaN for labels with no pixels)."""
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, rows.ravel(), n + 1)[1:] / counts
        cx = np.bincount(flat, cols.ravel(), n + 1)[1:] / counts
    return cy, cx


def _run_model(model: NucleiModel, window: np.ndarray) -> tuple[np.ndarray, list[str], list[float]]:
    """One forward pass on an RGB window; checks the output against the contract of load_detector."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1)[None].float().div(255).to(model.device)
    try:
        with torch.inference_mode():
            instances, classes, scores = model.module(x)
        instances = instances.cpu().numpy().squeeze().astype(np.int64)
        scores = [float(s) for s in scores]
        classes = [str(c) for c in classes]
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        raise NucleiError(
            f"{model.path}: failed on a (1, 3, {window.shape[0]}, {window.shape[1]}) input or returned something other "
            f"than (instances, classes, scores) ({str(err).splitlines()[0]}); the contract is in histosynth.nuclei.model.load_detector"
        ) from err
    if instances.shape != window.shape[:2] or len(scores) != len(classes) or instances.max(initial=0) > len(classes):
        raise NucleiError(
            f"{model.path}: output instances of shape {instances.shape} with ids up to {instances.max(initial=0)}, "
            f"{len(classes)} classes and {len(scores)} scores for an input of {window.shape[0]}x{window.shape[1]}; "
            "the model must return one class and one score per instance id 1..N and a mask the size of its input"
        )
    return instances, classes, scores


def _map_classes(names: Sequence[str], params: Mapping, source: Path) -> list[str]:
    """Model class names as NUCLEUS_CLASSES names, via nuclei.model_classes (identity for names already in it)."""
    mapping = {name: name for name in NUCLEUS_CLASSES} | dict(params["model_classes"])
    unmapped = sorted(set(names) - set(mapping))
    if unmapped:
        raise NucleiError(
            f"{source}: the model's classes {unmapped} are not mapped; add them to nuclei.model_classes "
            f"(model class name -> one of {list(NUCLEUS_CLASSES)})"
        )
    return [mapping[name] for name in names]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
