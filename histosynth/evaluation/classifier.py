"""The classifier of the classification task: a timm backbone's globally pooled features
(num_classes=0), then BatchNorm, dropout and a linear layer to one logit per class (seed 004's
GAP -> BN -> dropout 0.2 -> dense softmax); its ImageNet weights, read offline only (the
configured file, the weights folder or the hub cache; else the network starts at random), its
input preparation, and its model/ folder (model.safetensors + histosynth.json)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histosynth.data.io import read_rgb
from histosynth.data.labels import label_index
from histosynth.device import autocast, channels_last, pick_device, prepare_model
from histosynth.files import MODEL_INFO
from histosynth.nets import IMAGENET_MEAN, IMAGENET_STD, normalise
from histosynth.seeds import derive_seed, seed_everything
from histosynth.training.epochs import data_loader, read_model_folder
from histosynth.weights import classifier_spec, read_state_dict, weights_file

log = logging.getLogger(__name__)


class ClassificationError(RuntimeError):
    """A classification run that cannot start: empty data, unknown labels, bad weights or folds."""


def prepare(
    images: torch.Tensor,
    image_size: int | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the network's float input: normalised (mean/std), resized to
    image_size x image_size (bilinear, antialiased) when set and different."""
    x = normalise(images, mean, std)
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def class_targets(names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Class indices (positions in class_names) of label names; an error naming unknown ones."""
    return label_index(names, {"classes": list(class_names)})


class ClassificationDataset(Dataset):
    """Items {'image': (3, H, W) float32 network input (prepare), 'target': int64 class index (-1
    without a `class` column), 'index': int} of rows with an absolute `image` path."""

    def __init__(
        self,
        table: pd.DataFrame,
        class_names: Sequence[str],
        image_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.images = table["image"].tolist()
        self.targets = class_targets(table["class"], class_names) if "class" in table else np.full(len(table), -1)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(read_rgb(self.images[i]).transpose(2, 0, 1).copy())
        return {
            "image": prepare(image[None], self.image_size, self.mean, self.std)[0],
            "target": torch.tensor(int(self.targets[i])),
            "index": i,
        }


# ----------------------------------------------------------------------------- model


class Classifier(torch.nn.Module):
    """A timm backbone's pooled features -> BatchNorm1d -> Dropout -> Linear (one logit per class)."""

    def __init__(self, model: str, n_classes: int, dropout: float = 0.2, freeze: bool = False):
        super().__init__()
        import timm

        try:
            self.backbone = timm.create_model(model, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise ClassificationError(f"classification.model={model!r} is not a timm model name ({err})") from err
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features  # pooled width
        self.head = torch.nn.Sequential(
            torch.nn.BatchNorm1d(features), torch.nn.Dropout(dropout), torch.nn.Linear(features, n_classes)
        )
        self.frozen = bool(freeze)
        self.backbone.requires_grad_(not self.frozen)

    def train(self, mode: bool = True):
        """As nn.Module.train, except that a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(settings: Mapping, n_classes: int) -> Classifier:
    """The classifier of the `classification` settings with random weights (timm never downloads here)."""
    return Classifier(settings["model"], n_classes, float(settings["dropout"]), bool(settings["freeze"]))


def normalisation(net: Classifier) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std of the timm model's pretrained config (ImageNet's unless it says otherwise)."""
    cfg = getattr(net.backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def hub_cache_file(model: str) -> Path | None:
    """The timm model's pretrained file in the local Hugging Face cache, if it is there (looked up
    on disk only, huggingface_hub.try_to_load_from_cache: never the network)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def classifier_weights_file(settings: Mapping, weights_dir: str | Path) -> tuple[Path | None, str]:
    """The timm state-dict file to start the backbone from and a line saying what was chosen: the
    configured weights_path (which must exist), else (pretrained) weights_dir/timm-<model>.safetensors
    (histosynth.weights; `snakemake fetch_weights` puts it there), else timm's file in the local
    Hugging Face cache, else None (random init) with how to provide it."""
    model, configured = settings["model"], settings["weights_path"]
    if configured and not Path(configured).is_file():
        raise ClassificationError(f"classification.weights_path={configured} does not exist")
    if configured:
        return Path(configured), f"classifier {model}: weights from {configured}"
    if not settings["pretrained"]:
        return None, f"classifier {model}: random init (classification.pretrained is false)"
    spec = classifier_spec(model)
    if spec is None:
        return None, (
            f"classifier {model}: timm has no ImageNet weights for it on the Hugging Face Hub; random init. "
            "To start from pretrained weights, save a state dict of the timm model to a file and set "
            "classification.weights_path to it"
        )
    path, note = weights_file(spec, None, weights_dir)
    if path is not None:
        return path, f"classifier {model}: ImageNet {note}"
    cached = hub_cache_file(model)
    if cached is not None:
        return cached, f"classifier {model}: ImageNet weights {cached} (local Hugging Face cache)"
    return None, (
        f"{note}, or on a machine with network run `python -c \"import timm; timm.create_model('{model}', "
        'pretrained=True)"` and copy its Hugging Face cache (~/.cache/huggingface/hub) to the same place here; '
        "random init"
    )


def load_backbone_weights(net: Classifier, path: str | Path) -> None:
    """Load a timm state dict (or a histosynth classifier's, keys under backbone.) into the
    backbone: every backbone tensor must be in the file; the file's classifier head is ignored."""
    state = {k.removeprefix("backbone."): v for k, v in read_state_dict(path).items()}
    try:
        missing, unused = net.backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ClassificationError(f"{path} does not fit timm model {type(net.backbone).__name__}: {err}") from err
    if missing:
        raise ClassificationError(
            f"{path} does not fit the timm backbone {type(net.backbone).__name__}: {len(missing)} "
            f"of its tensors are missing, e.g. {missing[:3]}; it must be that timm model's state dict"
        )
    log.info(
        "loaded the backbone's %d tensors from %s (%d in the file unused: its classifier head)",
        len(net.backbone.state_dict()),
        path,
        len(unused),
    )


def initial_model(settings: Mapping, n_classes: int, seed: int, weights_dir: str | Path) -> tuple[Classifier, str]:
    """The network a run starts from, fixed by the seed alone (and the weights file), and the weights note."""
    weights, note = classifier_weights_file(settings, weights_dir)
    log.info(note)
    seed_everything(derive_seed(seed, "classification", "init"))
    net = build_classifier(settings, n_classes)
    if weights is not None:
        load_backbone_weights(net, weights)
    return net, note


@dataclass
class ClassifierModel:
    """A trained classifier with what is needed to apply it."""

    net: Classifier
    class_names: list[str]
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    source: Path | None = None  # the model folder it was loaded from

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | np.ndarray | pd.DataFrame, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) of uint8 images (N, 3, H, W), or of rows with an absolute `image` path."""
        self.net.eval()
        if isinstance(images, pd.DataFrame):
            dataset = ClassificationDataset(images, self.class_names, self.image_size, self.mean, self.std)
            batches = (b["image"] for b in data_loader(dataset, batch_size, None, 0))
        else:
            images = torch.as_tensor(images)
            batches = (
                prepare(images[i : i + batch_size], self.image_size, self.mean, self.std)
                for i in range(0, len(images), batch_size)
            )
        out = [self._softmax(x) for x in batches]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.class_names)), np.float32)

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        x = channels_last(x)
        with autocast(self.device):
            return torch.softmax(self.net(x).float(), 1).cpu()


def save_classifier(
    net: Classifier, directory: Path, class_names: Sequence[str], settings: Mapping, extra: Mapping
) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    net = copy.deepcopy(net).cpu().to(memory_format=torch.contiguous_format)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    mean, std = normalisation(net)
    meta = {
        "class_names": list(class_names),
        "model": settings["model"],
        "image_size": settings["image_size"],
        "dropout": settings["dropout"],
        "normalisation": {"mean": mean, "std": std, "input": "RGB uint8 / 255"},
        "settings": dict(settings),
        **extra,
    }
    (directory / MODEL_INFO).write_text(json.dumps(meta, indent=2, default=str))


def load_classifier(directory: str | Path, device: str | torch.device = "auto") -> ClassifierModel:
    """Load a run's model/ folder (or the run folder holding it)."""
    from safetensors.torch import load_file

    directory, meta = read_model_folder(directory, "classifier", "train_classifier", ClassificationError)
    net = Classifier(meta["model"], len(meta["class_names"]), float(meta["dropout"]))
    net.load_state_dict(load_file(str(directory / "model.safetensors")))
    device = device if isinstance(device, torch.device) else pick_device(device)
    norm = meta["normalisation"]
    return ClassifierModel(
        prepare_model(net.eval(), device),
        list(meta["class_names"]),
        meta["image_size"],
        tuple(norm["mean"]),
        tuple(norm["std"]),
        device,
        directory,
    )
