"""Released HD-Yolo TorchScript files (impromptuRong/hd_yolo, run on slides by hd_wsi) as a nuclei
detector: prepared and tiled as hd_wsi runs them, their masks pasted into an instance map."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.color import rgb2hed

from histosynth.nuclei.instances import NucleiError, mean_per_instance, renumber, shape_table

# Resolution the released files were trained at (40x); nuclei.model_mpp should be this.
HDYOLO_MPP = 0.25
# Input sides are multiples of this.
HDYOLO_STRIDE = 64
# hd_wsi's NMS settings (configs.NMS_PARAMS), applied where the file has the key: the files'
# own max_det of 300 can truncate a dense 640 px tile.
HD_WSI_NMS_PARAMS = {"conf_thres": 0.15, "iou_thres": 0.45, "max_det": 1000.0}
# HD-Yolo label -> (histosynth nucleus class, hd_wsi's display colour). -100 marks a detection
# below the class threshold: a nucleus of no known class, which histosynth calls "other".
HDYOLO_LABELS = {
    1: ("tumor", "#00ff00"),
    2: ("stromal", "#ff0000"),
    3: ("immune", "#0000ff"),
    4: ("blood", "#ff00ff"),
    5: ("macrophage", "#ffff00"),
    6: ("dead", "#0094e1"),
    7: ("other", "#646464"),
    -100: ("other", "#949494"),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """HD-Yolo detections in image pixels, as hd_wsi exports them."""

    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64, keys of HDYOLO_LABELS
    masks: np.ndarray | None  # (N, m, m) float32 probabilities over each box; None when the model gave none


def is_hdyolo(module) -> bool:
    """Whether a loaded TorchScript module is an HD-Yolo file (it carries headers.det.nms_params)."""
    det = getattr(getattr(module, "headers", None), "det", None)
    return isinstance(getattr(det, "nms_params", None), dict)


def prepare_hdyolo(module, device: str, source: Path, nms_params: Mapping | None = None):
    """The loaded HD-Yolo `module` set up as hd_wsi runs it: fp32 on CPU (fp16 convolutions are not
    implemented there), fp16 on CUDA, in eval mode, with HD_WSI_NMS_PARAMS and then `nms_params`
    written into headers.det.nms_params (existing keys only, as floats)."""
    import torch

    current = dict(module.headers.det.nms_params)
    overrides = dict(nms_params or {})
    unknown = sorted(set(overrides) - set(current))
    if unknown:
        raise NucleiError(
            f"{source}: nms_params {unknown} are not settings of this HD-Yolo file; it has {sorted(current)}"
        )
    try:
        merged = {key: float(overrides.get(key, HD_WSI_NMS_PARAMS.get(key, value))) for key, value in current.items()}
    except (TypeError, ValueError) as err:
        raise NucleiError(f"{source}: nms_params must be numbers ({err}); got {overrides}") from err
    module.headers.det.nms_params = merged
    module = module.float() if torch.device(device).type == "cpu" else module.half().to(device)
    module.eval()
    log.info("%s: HD-Yolo on %s (%s), nms_params %s", source, device, next(module.parameters()).dtype, merged)
    return module


def tile_detections(rgb: np.ndarray, module, params: Mapping, source: Path, compute_masks: bool = True) -> Detections:
    """HD-Yolo detections on an RGB uint8 image at HDYOLO_MPP, tiled as hd_wsi tiles a slide: cores
    of params["tile"] pixels (rounded up to a multiple of 64) with params["pad"] pixels of context
    on each side (rounded up to a multiple of 32, so inputs are multiples of 64), zeros beyond the
    image. A detection is kept only by the tile whose core holds its box centre (cores are
    half-open, so a centre on a border has one owner), then shifted into image pixels."""
    h, w = rgb.shape[:2]
    tile = _round_up(params["tile"], HDYOLO_STRIDE)
    core_h, core_w = min(tile, _round_up(h, HDYOLO_STRIDE)), min(tile, _round_up(w, HDYOLO_STRIDE))
    pad = _round_up(params["pad"], HDYOLO_STRIDE // 2)
    n_rows, n_cols = math.ceil(h / core_h), math.ceil(w / core_w)
    canvas = np.zeros((n_rows * core_h + 2 * pad, n_cols * core_w + 2 * pad, 3), np.uint8)
    canvas[pad : pad + h, pad : pad + w] = rgb
    found = []
    for top in range(0, n_rows * core_h, core_h):
        for left in range(0, n_cols * core_w, core_w):
            window = canvas[top : top + core_h + 2 * pad, left : left + core_w + 2 * pad]
            det = _run(module, window, compute_masks, source)
            boxes = det.boxes + np.float32([left - pad, top - pad] * 2)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            keep = (cx >= left) & (cx < min(left + core_w, w)) & (cy >= top) & (cy < min(top + core_h, h))
            found.append(
                Detections(
                    boxes[keep], det.scores[keep], det.labels[keep], None if det.masks is None else det.masks[keep]
                )
            )
    with_boxes = [d for d in found if len(d.boxes)]
    masks = None
    if with_boxes and all(d.masks is not None for d in with_boxes):
        masks = np.concatenate([d.masks for d in with_boxes])
    return Detections(
        np.concatenate([d.boxes for d in found]),
        np.concatenate([d.scores for d in found]),
        np.concatenate([d.labels for d in found]),
        masks,
    )


def paste_instances(detections: Detections, shape: tuple[int, int]) -> np.ndarray:
    """Instance map (int32, id i + 1 for detection i) of an image of `shape` (rows, cols). Each
    mask is resized bilinearly to its rounded box (x1 - x0 + 1 by y1 - y0 + 1 pixels) and
    thresholded at 0.5, as hd_wsi pastes them; without masks the ellipse inscribed in the box is
    filled. Where instances overlap the larger label wins (hd_wsi's export), then the higher score."""
    import torch
    import torch.nn.functional as F

    instances = np.zeros(shape, np.int32)
    for i in np.lexsort((detections.scores, detections.labels)):  # ascending: later pastes win
        x0, y0, x1, y1 = np.round(detections.boxes[i]).astype(int)
        bw, bh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        if detections.masks is None:
            rows, cols = np.indices((bh, bw)) + 0.5
            mask = ((rows - bh / 2) / (bh / 2)) ** 2 + ((cols - bw / 2) / (bw / 2)) ** 2 <= 1
        else:
            probabilities = torch.from_numpy(detections.masks[i])[None, None]
            mask = F.interpolate(probabilities, size=(bh, bw), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5
        r0, c0, r1, c1 = max(y0, 0), max(x0, 0), min(y0 + bh, shape[0]), min(x0 + bw, shape[1])
        if r0 < r1 and c0 < c1:
            instances[r0:r1, c0:c1][mask[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0]] = i + 1
    return instances


def detect_hdyolo(
    rgb: np.ndarray, module, params: Mapping, source: Path, compute_masks: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """uint16 instances and their table (TABLE_COLUMNS) for an RGB uint8 image at HDYOLO_MPP:
    tile_detections pasted by paste_instances, classes from HDYOLO_LABELS; compute_masks=False
    asks the model for boxes only."""
    if not math.isclose(params["model_mpp"], HDYOLO_MPP, rel_tol=0.01):
        _note_resolution(source, params["model_mpp"])
    detections = tile_detections(rgb, module, params, source, compute_masks)
    instances = paste_instances(detections, rgb.shape[:2])
    table = shape_table(instances)
    if table.empty:
        return instances.astype(np.uint16), table
    positions = table["instance_id"].to_numpy() - 1
    table["class"] = [HDYOLO_LABELS[label][0] for label in detections.labels[positions]]
    table["score"] = detections.scores[positions].astype(np.float64)
    table["hematoxylin"] = mean_per_instance(instances, rgb2hed(rgb)[..., 0], table["instance_id"])
    return renumber(instances, table)  # overlaps can leave a detection no pixels


def _run(module, window: np.ndarray, compute_masks: bool, source: Path) -> Detections:
    """One forward pass on an RGB uint8 window: `_, outputs = module(x, compute_masks=...)`, x in
    [0, 1] in the module's dtype and device; outputs[0]["det"] checked and moved to numpy."""
    import torch

    first = next(module.parameters())
    x = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1)[None].to(first.device).float().div(255)
    try:
        with torch.inference_mode():
            _, outputs = module(x.to(first.dtype), compute_masks=compute_masks)
        det = outputs[0]["det"]
        boxes = det["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = det["scores"].float().cpu().numpy().reshape(-1)
        labels = det["labels"].cpu().numpy().astype(np.int64).reshape(-1)
        masks = det["masks"].float().cpu().numpy()[:, 0] if "masks" in det else None
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as err:
        raise NucleiError(
            f"{source}: the HD-Yolo model failed on a (1, 3, {window.shape[0]}, {window.shape[1]}) input or "
            f"returned no outputs[0]['det'] with boxes, scores and labels ({str(err).splitlines()[0]})"
        ) from err
    unknown = sorted(set(labels.tolist()) - set(HDYOLO_LABELS))
    n = len(boxes)
    if len(scores) != n or len(labels) != n or (masks is not None and len(masks) != n) or unknown:
        raise NucleiError(
            f"{source}: HD-Yolo output with {n} boxes, {len(scores)} scores, {len(labels)} labels, "
            f"{'no' if masks is None else len(masks)} masks and unknown labels {unknown}; "
            f"expected one of each per detection and labels in {sorted(HDYOLO_LABELS)}"
        )
    return Detections(boxes, scores, labels, masks)


@functools.cache
def _note_resolution(source: Path, mpp: float) -> None:
    log.warning(
        "%s is an HD-Yolo file, trained at %.2f mpp, but nuclei.model_mpp is %.3f: images are resampled to %.3f",
        source,
        HDYOLO_MPP,
        mpp,
        mpp,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
