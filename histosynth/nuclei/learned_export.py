"""The learned nuclei detector as TorchScript (histosynth.nuclei.model's contract): the trained net with
its decoding (a watershed of the predicted distance map from seeds) and MODEL_INFO inside."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.files import MODEL_INFO

if TYPE_CHECKING:
    from histosynth.nuclei.learned import NucleiNet


class _Detector(nn.Module):
    """The exported detector (histosynth.nuclei.model's contract): (1, 3, H, W) RGB in [0, 1] ->
    (instances (H, W), class names, scores). Decoding: foreground where p > 0.5; seeds where the
    distance exceeds seed_level and no boundary is predicted; seeds flood the foreground level by
    level down the distance map (a watershed of the distance); instances under min_area px are
    dropped; an instance's class is its pixels' most probable class summed, its score its mean
    foreground probability."""

    def __init__(self, net: nn.Module, classes: list[str], seed_level: float, min_area: int):
        super().__init__()
        self.net = net
        self.classes = classes
        self.seed_level = seed_level
        self.min_area = min_area

    def _grow(self, labels: torch.Tensor, allowed: torch.Tensor, fill_only: bool) -> torch.Tensor:
        for _ in range(4096):
            grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0]
            grown = torch.where(allowed, grown, torch.zeros_like(grown))
            if fill_only:
                grown = torch.where(labels > 0, labels, grown)
            if torch.equal(grown, labels):
                break
            labels = grown
        return labels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[str], list[float]]:
        out = self.net(x)[0].float()
        fg_prob = torch.sigmoid(out[0])
        foreground = fg_prob > 0.5
        distance = torch.sigmoid(out[2]) * foreground.float()
        seeds = foreground & (distance > self.seed_level) & (torch.sigmoid(out[1]) < 0.5)
        h, w = seeds.shape
        index = torch.arange(1, h * w + 1, dtype=torch.float32, device=x.device).reshape(h, w)
        labels = self._grow(torch.where(seeds, index, torch.zeros_like(index)), seeds, False)  # seed components
        for step in range(10):
            level = self.seed_level * (9 - step) / 10
            labels = self._grow(labels, foreground & (distance >= level), True)
        ids, inverse = torch.unique(labels, return_inverse=True)
        n = ids.numel() - 1 if bool(ids[0] == 0) else ids.numel()
        inverse = inverse if bool(ids[0] == 0) else inverse + 1
        area = torch.bincount(inverse.flatten(), minlength=n + 1)
        keep = area >= self.min_area
        keep[0] = False
        new_id = torch.cumsum(keep.long(), 0) * keep.long()
        instances = new_id[inverse]
        m = int(new_id.max())
        flat = instances.flatten()
        probs = torch.softmax(out[3:], 0).reshape(out.shape[0] - 3, -1)
        sums = torch.zeros(m + 1, probs.shape[0], device=x.device).index_add_(0, flat, probs.t())
        best: list[int] = sums[1:].argmax(1).tolist()
        counts = torch.bincount(flat, minlength=m + 1)[1:].clamp(min=1)
        score = torch.zeros(m + 1, device=x.device).index_add_(0, flat, fg_prob.flatten())[1:] / counts
        names = [self.classes[b] for b in best]
        scores: list[float] = score.tolist()
        return instances, names, scores


def export_detector(
    net: NucleiNet, path: str | Path, *, mpp: float, seed_level: float, min_area_um2: float, meta: Mapping
) -> Path:
    """Write `net` as a TorchScript detector of histosynth's contract, with MODEL_INFO (kind, mpp,
    classes and `meta`) inside; returns the path."""
    net = net.cpu().eval()
    classes = list(net.classes)
    example = torch.rand(1, 3, 64, 64)
    min_area = max(1, round(min_area_um2 / mpp**2))
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated upstream but still the one file format that carries the decoding
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example)
        module = torch.jit.script(_Detector(traced, classes, float(seed_level), int(min_area)))
    info = {
        "kind": "histosynth-nuclei",
        "mpp": mpp,
        "classes": classes,
        "seed_level": seed_level,
        "min_area_um2": min_area_um2,
        **meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    module.save(str(tmp), _extra_files={MODEL_INFO: json.dumps(info, default=str)})
    tmp.replace(path)
    return path
