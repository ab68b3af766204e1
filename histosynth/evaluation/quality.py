"""Image quality of the synthetic sets: FID, KID and IS (Inception features), LPIPS diversity, and
mask consistency (re-segment synthetic images, compare with the masks they were made from),
overall and per class, as tidy rows (set, metric, class, value, n_real, n_synthetic, status, note).

Pretrained weights are never downloaded here. Each network's file comes from its config key or,
when that is null, from the torch hub cache where torch-fidelity/torchvision would have put it
(`fetch_weights`, run by rule fetch_weights, fills that cache). When a file is missing, the metrics
needing it get rows with status "skipped" and a note naming the file, the config key and the rule;
the weight-free metrics still run.

- FID/KID/IS: torch-fidelity's InceptionV3 (the 2015-12-05 TF weights every FID paper uses), one
  pass per image giving pool features (quality.feature: 64/192/768/2048) and unbiased logits.
  FID is the closed form on the features' Gaussians (fid_from_features, float64); KID the unbiased
  polynomial-kernel MMD averaged over random subsets (torchmetrics' poly_mmd); IS on the synthetic
  images' logits in splits (torchmetrics' formula). Real images are the training split's patches.
- LPIPS diversity: mean LPIPS (torchmetrics' AlexNet LPIPS; its linear layers ship with
  torchmetrics, the AlexNet backbone is torchvision's ImageNet file) over random pairs of distinct
  synthetic images; higher = more diverse. Images under 64 px are upsampled to 64 for AlexNet.
- Mask consistency: the segmentation model (normally the ratio-0 one, trained on real data only)
  re-segments the synthetic images; IoU and Dice per region class, pooled over images. The nuclei
  detector (histosynth.nuclei.stage) re-detects nuclei; IoU and Dice of the nucleus foreground and per
  nucleus class against the conditioning map's nucleus channel.

Classes: a synthetic image's class is its manifest `label` (the diffusion class label: 0 = none,
n = n-th configured class), else its dominant class by frac_<class>; real images get their
dominant class. Class "all" is every image of the set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from histosynth.device import derive_seed, pick_device
from histosynth.evaluation.features import (
    SEGMENTATION, FeatureError, FeatureExtractor, build_extractor, image_features, pairwise_diversity,
)
from histosynth.data.io import read_mask, read_patch_index, read_rgb, write_table
from histosynth.data.patches import fraction_column
from histosynth.generators.training import merged

log = logging.getLogger(__name__)

QUALITY_DEFAULTS: dict = {
    "inception_weights": None,  # torch-fidelity InceptionV3 state dict; null: the torch hub cache
    "lpips_weights": None,      # torchvision AlexNet state dict (features.* used); null: the torch hub cache
    "feature": 2048,            # Inception pool features for FID/KID: 64 | 192 | 768 | 2048
    "max_images": 2000,         # images per set (real, each synthetic source), sampled when more
    "min_images": 10,           # a class with fewer real or synthetic images is skipped
    "kid_subsets": 100,
    "kid_subset_size": 1000,    # capped at the smaller set's size
    "is_splits": 10,
    "lpips_pairs": 500,
    "batch_size": 32,
    "device": "auto",
    "consistency": True,        # mask consistency with the segmentation model and the nuclei detector
    "extractor": "segmentation",  # offline feature space for FD/KD: segmentation (real-only encoder) | a timm model
    "extractor_weights": None,  # the timm model's local weights file
    "seed": 0,
}
COLUMNS = ("set", "metric", "class", "value", "n_real", "n_synthetic", "status", "note", "extractor")
LPIPS_MIN_SIDE = 64


@dataclass(frozen=True)
class WeightsSpec:
    key: str       # config key
    url: str       # where fetch_weights downloads it from
    use: str       # which metrics need it

    @property
    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(self.url).name


WEIGHTS = {
    "inception": WeightsSpec(
        "quality.inception_weights",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "FID, KID and IS"),
    "lpips": WeightsSpec("quality.lpips_weights", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "LPIPS"),
}


def settings_from(config: Mapping | None) -> dict:
    """QUALITY_DEFAULTS overridden by a (validated) `quality` config section."""
    return merged(QUALITY_DEFAULTS, config)


def weights_file(name: str, configured: str | Path | None) -> tuple[Path | None, str]:
    """The weights file for network `name` (inception | lpips) and a note: the configured path
    (which must exist), else the torch hub cache file when present, else None and how to provide it."""
    spec = WEIGHTS[name]
    if configured:
        path = Path(configured)
        if path.is_file():
            return path, f"weights {path}"
        return None, (f"{spec.use} skipped: {spec.key}={configured} does not exist; point {spec.key} at a copy of "
                      f"{spec.url} or set it to null and run `snakemake fetch_weights`")
    if spec.cache_path.is_file():
        return spec.cache_path, f"weights {spec.cache_path}"
    return None, (f"{spec.use} skipped: missing {spec.cache_path}; run `snakemake fetch_weights` (downloads {spec.url} "
                  f"there) or set {spec.key} to a local copy of that file")


def fetch_weights(names: Sequence[str] = tuple(WEIGHTS), progress: bool = True) -> list[Path]:
    """Download the missing weight files into the torch hub cache (rule fetch_weights; needs network)."""
    paths = []
    for name in names:
        spec = WEIGHTS[name]
        if not spec.cache_path.is_file():
            spec.cache_path.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s -> %s", spec.url, spec.cache_path)
            torch.hub.download_url_to_file(spec.url, str(spec.cache_path), progress=progress)
        paths.append(spec.cache_path)
    return paths


# ----------------------------------------------------------------------------- maths

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def fid_from_features(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the trace of the square
    root taken as the sum of square roots of the eigenvalues of sigma1 @ sigma2 (real and >= 0 for
    covariance matrices; tiny negative round-off is clipped), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eigenvalues).sum())


def fid(real: np.ndarray, synthetic: np.ndarray) -> float:
    return fid_from_features(*gaussian_stats(real), *gaussian_stats(synthetic))


def kid(real: np.ndarray, synthetic: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets (without replacement) of min(subset_size, n)
    images per set: the unbiased MMD^2 with the kernel (x.y / d + 1)^3 (torchmetrics' poly_mmd)."""
    from torchmetrics.image.kid import poly_mmd

    real_t, syn_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(synthetic, dtype=torch.float64)
    size = min(subset_size, len(real_t), len(syn_t))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(real_t)} real and {len(syn_t)} synthetic")
    generator = torch.Generator().manual_seed(seed)
    scores = [poly_mmd(real_t[torch.randperm(len(real_t), generator=generator)[:size]],
                       syn_t[torch.randperm(len(syn_t), generator=generator)[:size]]) for _ in range(subsets)]
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS mean and std over splits: exp(E_x KL(p(y|x) || p(y))) per split (torchmetrics' formula)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    logits = logits[torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))]
    splits = max(1, min(splits, len(logits)))
    values = []
    for part in logits.chunk(splits):
        prob, log_prob = part.softmax(1), part.log_softmax(1)
        kl = (prob * (log_prob - prob.mean(0, keepdim=True).log())).sum(1).mean()
        values.append(kl.exp())
    values = torch.stack(values)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------- networks

def load_inception(path: str | Path, feature: int = 2048):
    """torch-fidelity's InceptionV3 with weights from `path`, giving (pool features, unbiased logits)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if str(feature) not in ("64", "192", "768", "2048"):
        raise ValueError(f"quality.feature must be 64, 192, 768 or 2048, got {feature}")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", [str(feature), "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
    except RuntimeError as err:
        raise RuntimeError(f"{path}: not an InceptionV3 state dict for torch-fidelity ({err}); "
                           f"replace it with {WEIGHTS['inception'].url}") from err
    return net.eval()


def read_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """uint8 (N, 3, H, W) of same-sized RGB images."""
    arrays = [read_rgb(path) for path in paths]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def inception_features(paths: Sequence[str | Path], net, batch_size: int = 32, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) float64 arrays for the images at `paths`."""
    device = device or torch.device("cpu")
    net = net.to(device)
    features, logits = [], []
    for start in range(0, len(paths), batch_size):
        f, lg = net(read_images(paths[start:start + batch_size]).to(device))
        features.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    if not features:
        return np.empty((0, 0)), np.empty((0, 0))
    return np.concatenate(features), np.concatenate(logits)


def load_lpips(path: str | Path):
    """torchmetrics' AlexNet LPIPS with the backbone from `path` (a torchvision alexnet state dict,
    or a full LPIPS one), loaded by histosynth.generators.autoencoder.load_lpips, which never downloads."""
    from histosynth.generators.autoencoder import load_lpips as load_lpips_network
    from histosynth.generators.training import TrainingError

    try:
        return load_lpips_network(path, "alex")
    except TrainingError as err:
        raise RuntimeError(f"{err}; expected a torchvision AlexNet state dict such as {WEIGHTS['lpips'].url}") from err


@torch.no_grad()
def lpips_diversity(paths: Sequence[str | Path], net, pairs: int = 500, seed: int = 0, batch_size: int = 32, device=None) -> float:
    """Mean LPIPS over `pairs` random pairs of distinct images (all pairs when fewer exist)."""
    device = device or torch.device("cpu")
    n = len(paths)
    if n < 2:
        raise ValueError("LPIPS diversity needs at least 2 images")
    every = [(i, j) for i in range(n) for j in range(i + 1, n)] if n * (n - 1) // 2 <= pairs else None
    if every is None:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, pairs)
        second = (first + rng.integers(1, n, pairs)) % n  # never the same image
        every = list(zip(first.tolist(), second.tolist(), strict=True))
    net = net.to(device)
    cache: dict[int, torch.Tensor] = {}

    def image(i):
        if i not in cache:
            x = read_images([paths[i]]).float() / 127.5 - 1
            if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
                x = torch.nn.functional.interpolate(x, size=(LPIPS_MIN_SIDE, LPIPS_MIN_SIDE), mode="bilinear", align_corners=False)
            cache[i] = x[0]
        return cache[i]

    scores = []
    for start in range(0, len(every), batch_size):
        chunk = every[start:start + batch_size]
        a = torch.stack([image(i) for i, _ in chunk]).to(device)
        b = torch.stack([image(j) for _, j in chunk]).to(device)
        scores.append(net(a, b).flatten().cpu())
    return float(torch.cat(scores).mean())


# ----------------------------------------------------------------------------- consistency

def overlap_scores(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Pixel intersection, |truth|, |pred| of two boolean masks."""
    return int(np.sum(truth & pred)), int(truth.sum()), int(pred.sum())


def _iou_dice(inter, a, b):
    """IoU and Dice from intersection and the two sizes (scalars or arrays); NaN where both are empty."""
    inter, a, b = (np.asarray(v, np.float64) for v in (inter, a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(a + b - inter > 0, inter / (a + b - inter), np.nan)
        dice = np.where(a + b > 0, 2 * inter / (a + b), np.nan)
    return (float(iou), float(dice)) if iou.ndim == 0 else (iou, dice)


SCORE_COLUMNS = ("id", "kind", "class", "intersection", "truth_pixels", "predicted_pixels", "iou", "dice")


def _scores(records: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(records, columns=SCORE_COLUMNS[:-2])
    table["iou"], table["dice"] = _iou_dice(table["intersection"], table["truth_pixels"], table["predicted_pixels"])
    return table


def _ids(rows: pd.DataFrame) -> list[str]:
    return rows["id"].astype(str).tolist() if "id" in rows else [str(i) for i in range(len(rows))]


def region_scores(rows: pd.DataFrame, classes: Sequence[str], segment: Callable[[np.ndarray], np.ndarray],
                  images: Sequence[str | Path] | None = None, outside_painted: bool = False) -> pd.DataFrame:
    """Per image and region class (kind 'region'): pixel intersection, truth and predicted pixel
    counts, IoU and Dice between the image's `mask` and segment(image) (a label mask of the same
    values). NaN IoU/Dice where the class is neither drawn nor found. `images` segments other
    images against the same masks (e.g. the real source patches); with `outside_painted`, rows with
    a donor (inpainted) count only the pixels outside their painted target-class region and leave
    that class out."""
    records = []
    images = rows["image"] if images is None else images
    for image_id, (_, row), image_path in zip(_ids(rows), rows.iterrows(), images, strict=True):
        truth, pred = read_mask(row["mask"]), segment(read_rgb(image_path))
        painted = row.get("target_class") if outside_painted and pd.notna(row.get("donor_patch_id")) else None
        target = list(classes).index(painted) + 1 if painted in classes else None
        outside = truth != target if target else np.ones(truth.shape, bool)
        for k, name in enumerate(classes, 1):
            if k != target:
                inter, a, b = overlap_scores((truth == k) & outside, (pred == k) & outside)
                records.append({"id": image_id, "kind": "region", "class": name, "intersection": inter,
                                "truth_pixels": a, "predicted_pixels": b})
    return _scores(records)


def nuclei_scores(rows: pd.DataFrame, mpp: float, params, model=None) -> pd.DataFrame:
    """Per image (kind 'nuclei'): the same counts for the re-detected nuclei (histosynth.nuclei.stage
    with `params`, a learned model when params.model is set) against the conditioning map's
    nucleus channel: the foreground (class 'nuclei') and each nucleus class drawn or found."""
    from histosynth.generators.conditioning import read_conditioning
    from histosynth.nuclei.instances import NUCLEUS_CLASSES
    from histosynth.nuclei.stage import segment_patch

    lookup = {name: i + 1 for i, name in enumerate(NUCLEUS_CLASSES)}
    records = []
    for image_id, image_path, cond_path in zip(_ids(rows), rows["image"], rows["conditioning"], strict=True):
        rgb = read_rgb(image_path)
        truth = read_conditioning(cond_path)[..., 1]
        instances, table = segment_patch(rgb, mpp, rgb.shape[:2], params, model)
        lut = np.zeros(int(instances.max(initial=0)) + 1, np.uint8)
        for instance_id, name in zip(table.get("instance_id", []), table.get("class", []), strict=True):
            lut[int(instance_id)] = lookup.get(name, 0)
        pred = lut[instances]
        for k, name in enumerate(["nuclei", *NUCLEUS_CLASSES]):
            inter, a, b = overlap_scores(truth > 0, pred > 0) if k == 0 else overlap_scores(truth == k, pred == k)
            if k == 0 or a or b:
                records.append({"id": image_id, "kind": "nuclei", "class": name, "intersection": inter,
                                "truth_pixels": a, "predicted_pixels": b})
    return _scores(records)


def pooled_consistency(scores: pd.DataFrame) -> list[dict]:
    """Quality rows from per-image scores: IoU and Dice per kind and class from the pixel counts
    summed over images (mask_iou/mask_dice for regions, nuclei_iou/nuclei_dice for nuclei)."""
    out = []
    for (kind, name), part in scores.groupby(["kind", "class"], sort=False):
        inter, a, b = (int(part[c].sum()) for c in ("intersection", "truth_pixels", "predicted_pixels"))
        iou, dice = _iou_dice(inter, a, b)
        prefix = "mask" if kind == "region" else "nuclei"
        note = "class absent from the conditioning masks" if kind == "region" and not a else ""
        out += [{"metric": f"{prefix}_iou", "class": name, "value": iou, "note": note},
                {"metric": f"{prefix}_dice", "class": name, "value": dice, "note": note}]
    return out


# ----------------------------------------------------------------------------- the table

def image_classes(table: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Class name per row: `label` (0 = none, n = n-th class) when present, else the dominant
    frac_<class>, else 'none'."""
    names = np.array(["none", *classes], dtype=object)
    if "label" in table and table["label"].notna().all():
        return names[table["label"].astype(int).clip(0, len(classes)).to_numpy()]
    columns = [fraction_column(c) for c in classes]
    if not classes or any(c not in table for c in columns):
        return np.full(len(table), "none", dtype=object)
    fractions = table[columns].to_numpy(float)
    return names[np.where(fractions.max(axis=1) > 0, fractions.argmax(axis=1) + 1, 0)]


def _sample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(table) <= n:
        return table.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(table), n, replace=False))
    return table.iloc[keep].reset_index(drop=True)


def image_quality(real: pd.DataFrame, synthetic: Mapping[str, pd.DataFrame], classes: Sequence[str], *,
                  settings: Mapping | None = None, segment: Callable[[np.ndarray], np.ndarray] | None = None,
                  nuclei_params=None, nuclei_model=None, mpp: float | None = None,
                  extractor: FeatureExtractor | None = None, extractor_note: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy quality rows for each synthetic set ({mode: manifest rows, absolute paths}) against
    the real training rows, and the per-image consistency scores (set, id, kind, class, counts,
    IoU, Dice). `segment` (rgb -> label mask, e.g. SegmentationModel.predict) enables region mask
    consistency; nuclei_params (histosynth.nuclei.instances.NucleiParams, with nuclei_model when a learned
    detector is configured) and mpp enable nuclei consistency for sets with a conditioning
    column; `extractor` (histosynth.evaluation.features) gives the offline Fréchet distance, KID and
    feature diversity (extractor_note says why it is missing when it is None)."""
    s = settings_from(settings)
    device = pick_device(s["device"])
    all_real = real
    real = _sample(real[real["split"] == "train"] if "split" in real else real, s["max_images"], derive_seed(s["seed"], "real"))
    real_classes = image_classes(real, classes)
    rows: list[dict] = []
    scores: list[pd.DataFrame] = []

    inception_path, inception_note = weights_file("inception", s["inception_weights"])
    lpips_path, lpips_note = weights_file("lpips", s["lpips_weights"])
    inception_name, lpips_name = f"inception-v3 pool {s['feature']} (torch-fidelity)", "lpips alexnet (torchmetrics)"
    real_features = real_logits = None
    if inception_path is not None:
        net = load_inception(inception_path, s["feature"])
        log.info("Inception features of %d real images (%s)", len(real), inception_note)
        real_features, real_logits = inception_features(real["image"].tolist(), net, s["batch_size"], device)
    lpips_net = load_lpips(lpips_path) if lpips_path is not None else None
    real_embedded = None
    if extractor is not None:
        log.info("%s features of %d real images", extractor.name, len(real))
        real_embedded = image_features(real["image"].tolist(), extractor, s["batch_size"])

    for mode, table in synthetic.items():
        table = _sample(table, s["max_images"], derive_seed(s["seed"], "synthetic", mode))
        syn_classes = image_classes(table, classes)
        groups = ["all", *[c for c in ["none", *classes] if (syn_classes == c).any() or (real_classes == c).any()]]

        def add(metric, name, value, n_real, n_syn, status="ok", note="", used="", mode=mode):
            rows.append({"set": mode, "metric": metric, "class": name, "value": value, "n_real": n_real,
                         "n_synthetic": n_syn, "status": status, "note": note, "extractor": used})

        if table.empty:
            add("images", "all", 0.0, len(real), 0, "skipped", f"synthetic set {mode} is empty")
            continue
        features = logits = embedded = None
        if inception_path is not None:
            log.info("Inception features of %d %s images", len(table), mode)
            features, logits = inception_features(table["image"].tolist(), net, s["batch_size"], device)
        if extractor is not None:
            embedded = image_features(table["image"].tolist(), extractor, s["batch_size"])
        for group in groups:
            r = np.ones(len(real), bool) if group == "all" else real_classes == group
            g = np.ones(len(table), bool) if group == "all" else syn_classes == group
            n_r, n_g = int(r.sum()), int(g.sum())
            few = n_r < s["min_images"] or n_g < s["min_images"]
            few_note = (f"{mode}, class {group}: {n_r} real and {n_g} synthetic images, fewer than "
                        f"quality.min_images={s['min_images']}")
            if features is None or few:
                for metric in ("fid", "kid", "kid_std", "is", "is_std"):
                    add(metric, group, math.nan, n_r, n_g, "skipped", few_note if features is not None else inception_note,
                        inception_name)
            else:
                add("fid", group, fid(real_features[r], features[g]), n_r, n_g, used=inception_name)
                kid_mean, kid_std = kid(real_features[r], features[g], s["kid_subsets"], s["kid_subset_size"], s["seed"])
                add("kid", group, kid_mean, n_r, n_g, used=inception_name)
                add("kid_std", group, kid_std, n_r, n_g, used=inception_name)
                is_mean, is_std = inception_score(logits[g], s["is_splits"], s["seed"])
                add("is", group, is_mean, n_r, n_g, used=inception_name)
                add("is_std", group, is_std, n_r, n_g, used=inception_name)
            if embedded is None or few:
                for metric in ("fd", "kd", "kd_std", "feature_diversity"):
                    add(metric, group, math.nan, n_r, n_g, "skipped", few_note if embedded is not None else extractor_note,
                        extractor.name if extractor is not None else "")
            else:
                add("fd", group, fid(real_embedded[r], embedded[g]), n_r, n_g, used=extractor.name)
                kd_mean, kd_std = kid(real_embedded[r], embedded[g], s["kid_subsets"], s["kid_subset_size"], s["seed"])
                add("kd", group, kd_mean, n_r, n_g, used=extractor.name)
                add("kd_std", group, kd_std, n_r, n_g, used=extractor.name)
                real_diversity = pairwise_diversity(real_embedded[r], s["lpips_pairs"], s["seed"])
                add("feature_diversity", group, pairwise_diversity(embedded[g], s["lpips_pairs"], s["seed"]), n_r, n_g,
                    note=f"real images: {real_diversity:.4f}", used=extractor.name)
            if lpips_net is None or n_g < max(2, s["min_images"]):
                add("lpips_diversity", group, math.nan, n_r, n_g, "skipped", lpips_note if lpips_net is None else few_note,
                    lpips_name)
            else:
                paths = table.loc[g, "image"].tolist()
                add("lpips_diversity", group, lpips_diversity(paths, lpips_net, s["lpips_pairs"], s["seed"], s["batch_size"], device),
                    n_r, n_g, used=lpips_name)
        if s["consistency"]:
            found = _consistency(table, classes, segment, nuclei_params, nuclei_model, mpp,
                                 lambda **kw: add(n_real=0, n_syn=len(table), **kw))
            scores.append(found.assign(set=mode))
            if segment is not None:
                for row in _real_reference(table, all_real, classes, segment):
                    add(**row, n_real=int(table["source_patch_id"].nunique()), n_syn=len(table), used="segmentation model")
    per_image = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=SCORE_COLUMNS)
    return pd.DataFrame(rows, columns=COLUMNS), per_image.reindex(columns=["set", *SCORE_COLUMNS])


def _real_reference(table: pd.DataFrame, real: pd.DataFrame, classes, segment) -> list[dict]:
    """mask_iou_real/mask_dice_real rows: the region scores of the real patch each synthetic image
    was made from against the synthetic image's mask (inpainted images: outside the painted
    region), pooled; the segmenter's ceiling on the same masks. None when the set's real source
    patches are not among `real`."""
    if "source_patch_id" not in table or "patch_id" not in real:
        return []
    sources = real.drop_duplicates("patch_id").set_index("patch_id").reindex(table["source_patch_id"].astype(str))
    if sources["image"].isna().any():
        return []
    note = "the real source patches of the same masks (inpainting: outside the painted region)"
    return [{"metric": f"{r['metric']}_real", "name": r["class"], "value": r["value"], "note": note}
            for r in pooled_consistency(region_scores(table, classes, segment, sources["image"], outside_painted=True))]


def _consistency(table, classes, segment, nuclei_params, nuclei_model, mpp, add) -> pd.DataFrame:
    """Per-image scores of one set; adds the pooled rows (or skip rows) through `add`."""
    found = []
    if segment is None:
        add(metric="mask_iou", name="all", value=math.nan, status="skipped",
            note="no segmentation model given (the ratio-0 model of rule train_segmentation)")
    else:
        found.append(region_scores(table, classes, segment))
    if nuclei_params is None or mpp is None or "conditioning" not in table:
        why = "no conditioning maps in the manifest" if "conditioning" not in table else "nuclei settings not given"
        add(metric="nuclei_iou", name="nuclei", value=math.nan, status="skipped", note=why)
    else:
        found.append(nuclei_scores(table, mpp, nuclei_params, nuclei_model))
    scores = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=SCORE_COLUMNS)
    detector = "nuclei detector " + (str(nuclei_model.path) if nuclei_model is not None else "(classical)")
    for row in pooled_consistency(scores):
        add(**{"name" if k == "class" else k: v for k, v in row.items()},
            used="segmentation model" if row["metric"].startswith("mask") else detector)
    return scores


def image_quality_stage(real_indexes: Sequence[str | Path], manifests: Mapping[str, str | Path], out: str | Path, *,
                        scores_out: str | Path | None = None, config: Mapping,
                        segmentation_model: str | Path | None = None) -> pd.DataFrame:
    """Entry of rule image_quality: real training patches vs each synthetic manifest ({mode: path});
    the segmentation run folder (ratio 0) enables region mask consistency and, with
    quality.extractor 'segmentation', the offline feature space. Writes `out` (the quality table)
    and `scores_out` (per-image consistency scores)."""
    from histosynth.nuclei.instances import NucleiParams
    from histosynth.nuclei.model import load_detector

    real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
    synthetic = {}
    for mode, path in manifests.items():
        names = pq.read_schema(path).names
        columns = tuple(c for c in ("image", "mask", "conditioning") if c in names)
        synthetic[mode] = read_patch_index(path, columns=columns)
    s = settings_from(config.get("quality"))
    segmenter = None
    if segmentation_model is not None and (s["consistency"] or s["extractor"] == SEGMENTATION):
        from histosynth.evaluation.segmentation import load_model

        segmenter = load_model(segmentation_model, s["device"])
    segment = segmenter.predict if segmenter is not None and s["consistency"] else None
    extractor, extractor_note = None, ""
    try:
        extractor = build_extractor(s["extractor"], s["extractor_weights"], segmenter, s["device"])
    except FeatureError as err:
        extractor_note = f"offline FD/KD skipped: {err}"
        log.warning("%s", extractor_note)
    nuclei = config.get("nuclei", {})
    nuclei_params = NucleiParams.from_config(nuclei) if nuclei else NucleiParams()
    nuclei_model = load_detector(nuclei["model"], str(pick_device(s["device"]))) if nuclei.get("model") else None
    table, scores = image_quality(real, synthetic, config["classes"], settings=s, segment=segment,
                                  nuclei_params=nuclei_params, nuclei_model=nuclei_model, mpp=config["patches"]["mpp"],
                                  extractor=extractor, extractor_note=extractor_note)
    write_table(table, out)
    if scores_out is not None:
        write_table(scores, scores_out)
    return table
