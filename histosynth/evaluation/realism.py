"""Realism of a synthetic set as a reader of slides sees it: can a classifier tell its images from
real training patches, and are they as sharp?

- Sharpness and spectrum (no learning): the variance of the Laplacian of the grey image (0-255
  scale; blur lowers it), the radially averaged power spectrum (Hann-windowed, mean removed), and
  its high-frequency share, the power above a quarter of the sampling frequency over the total.
- A classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): real and synthetic images are split
  into k stratified folds; two learners that need no downloaded weights are trained on k - 1 folds
  and score the held-out one — a logistic regression on texture statistics (sharpness, spectral
  shape, colour moments) and a small CNN trained from scratch on the pixels — and each image's
  out-of-fold probability of being synthetic is the mean of the two. The statistic is the ROC AUC
  of those probabilities within each fold, averaged over folds: 0.5 when nothing tells the sets
  apart, 1 when every image is told apart; its interval is Nadeau and Bengio's corrected resampled
  t over the folds (TwoSampleTest.interval). Per class it is the AUC among that class's images. The real images are drawn to match the synthetic set's class composition, so a set drawn
  class-balanced is not told apart by how often each class occurs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage, stats

from histosynth.seeds import derive_seed

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

HIGH_FREQUENCY = 0.25  # cycles per pixel: a quarter of the sampling frequency
SPECTRUM_BINS = 16  # radial frequency bins from 0 to the Nyquist frequency (0.5 cycles/pixel)


def grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W) float grey values (0-255, ITU-R 601 luma) of (N, H, W, 3) uint8 images."""
    return images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """(N,) the variance of the 3x3 Laplacian of each grey image (border pixels left out)."""
    values = grey(images)
    lap = np.stack([ndimage.laplace(v) for v in values])[:, 1:-1, 1:-1]
    return lap.reshape(len(lap), -1).var(axis=1)


def _power(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) power spectra of the windowed, mean-removed grey images and (H, W) radial frequencies."""
    values = grey(images)
    _, h, w = values.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    values = (values - values.mean(axis=(1, 2), keepdims=True)) * window
    power = np.abs(np.fft.fft2(values)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    return power, np.hypot(fy, fx)


def _radial(power: np.ndarray, radius: np.ndarray, bins: int = SPECTRUM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres in cycles/pixel, (N, bins) mean power per radial bin) up to the Nyquist frequency."""
    edges = np.linspace(0, 0.5, bins + 1)
    which = np.digitize(radius, edges) - 1
    inside = (which >= 0) & (which < bins) & (radius > 0)
    counts = np.bincount(which[inside], minlength=bins)
    sums = np.stack([np.bincount(which[inside], weights=p[inside], minlength=bins) for p in power])
    return (edges[:-1] + edges[1:]) / 2, sums / np.maximum(counts, 1)


def _share(power: np.ndarray, radius: np.ndarray, cutoff: float = HIGH_FREQUENCY) -> np.ndarray:
    """(N,) share of each image's spectral power (DC left out) above `cutoff` cycles per pixel."""
    total = power[:, radius > 0].sum(axis=1)
    return power[:, radius > cutoff].sum(axis=1) / np.maximum(total, 1e-12)


def image_measures(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, from one power spectrum: laplacian_variance, high_frequency_share, spectrum
    (N, SPECTRUM_BINS), and the bins' frequencies."""
    power, radius = _power(images)
    frequencies, spectrum = _radial(power, radius)
    return {
        "laplacian_variance": laplacian_variance(images),
        "high_frequency_share": _share(power, radius),
        "spectrum": spectrum,
        "frequencies": frequencies,
    }


def texture_statistics(images: np.ndarray, measures: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(N, 8 + SPECTRUM_BINS) per-image statistics the linear learner sees: log Laplacian variance,
    log high-frequency share, log mean gradient magnitude, RGB means and standard deviations
    (0-1) and the log spectral shape (each radial bin's share of the image's power); `measures` are
    the images' image_measures where already computed."""
    m = image_measures(images) if measures is None else measures
    gradient = np.hypot(*np.gradient(grey(images), axis=(1, 2))).mean(axis=(1, 2))
    spectrum = m["spectrum"]
    shape = spectrum / np.maximum(spectrum.sum(axis=1, keepdims=True), 1e-12)
    rgb = images.astype(np.float32) / 255
    return np.column_stack(
        [
            np.log1p(m["laplacian_variance"]),
            np.log(m["high_frequency_share"] + 1e-9),
            np.log1p(gradient),
            rgb.mean(axis=(1, 2)),
            rgb.std(axis=(1, 2)),
            np.log(shape + 1e-9),
        ]
    )


# ----------------------------------------------------------------------------- the two-sample test


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of scores for bool labels (True = positive) from ranks (ties share their rank); NaN
    without both kinds."""
    labels = np.asarray(labels, bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if not n1 or not n0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@dataclass(frozen=True)
class TwoSampleTest:
    """Out-of-fold probabilities of 'synthetic' for every image, which were synthetic, and the fold
    that scored each."""

    synthetic: np.ndarray  # bool (N,)
    probability: np.ndarray  # (N,) mean of the two learners' out-of-fold probabilities
    linear: np.ndarray  # (N,) the texture-statistics learner's
    cnn: np.ndarray  # (N,) the pixel CNN's
    fold: np.ndarray  # (N,) fold index

    def fold_aucs(self, subset: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
        """AUC within each fold (its own models) among `subset`; folds without both kinds left out."""
        keep = np.ones(len(self.synthetic), bool) if subset is None else subset
        scores = self.probability if scores is None else scores
        values = [
            auc(self.synthetic[keep & (self.fold == k)], scores[keep & (self.fold == k)]) for k in np.unique(self.fold)
        ]
        return np.array([v for v in values if not math.isnan(v)])

    def auc(self, subset: np.ndarray | None = None, scores: np.ndarray | None = None) -> float:
        """The mean of the folds' AUCs (NaN when no fold has both kinds)."""
        values = self.fold_aucs(subset, scores)
        return float(values.mean()) if len(values) else math.nan

    def interval(self, confidence: float, subset: np.ndarray | None = None) -> tuple[float, float]:
        """Interval of the mean fold AUC by Nadeau and Bengio's corrected resampled t (Machine
        Learning 2003): the folds' AUCs share training images, so their variance counts with
        1/J + n_test/n_train instead of 1/J, on J - 1 degrees of freedom. A bootstrap over images
        ignores that sharing: on data with no difference it held 0.5 in only 72-83 % of draws."""
        values = self.fold_aucs(subset)
        folds = len(np.unique(self.fold))
        if len(values) < 2:
            return math.nan, math.nan
        se = math.sqrt((1 / len(values) + 1 / (folds - 1)) * values.var(ddof=1))
        half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * se
        return float(max(values.mean() - half, 0.0)), float(min(values.mean() + half, 1.0))  # an AUC lies in [0, 1]


def _linear_probabilities(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
    model.fit(features[train], labels[train])
    return model.predict_proba(features[test])[:, 1]


def critic(width: int):
    """The pixel learner: a small CNN of three stride-2 3x3 convolutions (a stride-2 filter still
    sees the finest frequencies, at a quarter of the cost), global average pooling, one logit."""
    from torch import nn

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2)]

    return nn.Sequential(
        *conv(3, width),
        *conv(width, 2 * width),
        *conv(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 1),
    )


def _cnn_probabilities(
    images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, s: Mapping, seed: int, device
) -> np.ndarray:
    import torch

    from histosynth.nets import dihedral, random_ops

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = critic(s["width"]).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=1e-4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.astype(np.float32))
    n_pos = float(labels[train].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(train) - n_pos) / max(n_pos, 1.0), device=device))

    def prepared(batch):
        return batch.to(device).float() / 127.5 - 1

    net.train()
    for _ in range(s["epochs"]):
        order = train[torch.randperm(len(train), generator=generator).numpy()]
        for start in range(0, len(order), s["batch_size"]):
            idx = order[start : start + s["batch_size"]]
            batch = dihedral(x[idx], random_ops(len(idx), generator))
            loss = loss_fn(net(prepared(batch))[:, 0], y[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(prepared(x[test[i : i + 256]]))[:, 0].float().cpu() for i in range(0, len(test), 256)])
    return torch.sigmoid(logits).numpy()


def two_sample_test(
    real: np.ndarray,
    synthetic: np.ndarray,
    settings: Mapping,
    *,
    seed: int,
    device="cpu",
    features: np.ndarray | None = None,
) -> TwoSampleTest:
    """The C2ST's out-of-fold probabilities for (N, H, W, 3) uint8 real and synthetic images of one
    size (settings: folds, epochs, width, batch_size, lr); folds are stratified by kind. `features`:
    the texture_statistics of real then synthetic images, where already computed."""
    from sklearn.model_selection import StratifiedKFold

    images = np.concatenate([real, synthetic])
    labels = np.r_[np.zeros(len(real), bool), np.ones(len(synthetic), bool)]
    folds = min(settings["folds"], len(real), len(synthetic))
    if folds < 2:
        raise ValueError(
            f"a two-sample test needs at least 2 real and 2 synthetic images, got {len(real)} and {len(synthetic)}"
        )
    features = texture_statistics(images) if features is None else features
    linear, cnn, fold = np.zeros(len(images)), np.zeros(len(images)), np.zeros(len(images), int)
    split = StratifiedKFold(folds, shuffle=True, random_state=derive_seed(seed, "folds") % 2**32)
    for k, (train, test) in enumerate(split.split(images, labels)):
        fold[test] = k
        linear[test] = _linear_probabilities(features, labels, train, test)
        cnn[test] = _cnn_probabilities(images, labels, train, test, settings, derive_seed(seed, "cnn", k), device)
        log.info(
            "C2ST fold %d/%d: held-out AUC linear %.3f, cnn %.3f",
            k + 1,
            folds,
            auc(labels[test], linear[test]),
            auc(labels[test], cnn[test]),
        )
    return TwoSampleTest(labels, (linear + cnn) / 2, linear, cnn, fold)


# ----------------------------------------------------------------------------- per set and class

ROW_METRICS = ("c2st_auc", "c2st_low", "c2st_high", "laplacian_ratio", "high_frequency_ratio")
IMAGE_COLUMNS = (
    "set",
    "kind",
    "id",
    "class",
    "laplacian_variance",
    "high_frequency_share",
    "p_synthetic",
    "p_linear",
    "p_cnn",
    "spectrum",
)


def matched_real(real_classes: np.ndarray, synthetic_classes: np.ndarray, per_synthetic: int, seed: int) -> np.ndarray:
    """Positions of real images drawn to follow the synthetic set's class composition: for each
    class, up to per_synthetic real images per synthetic one (all of them where fewer exist)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name, count in zip(*np.unique(synthetic_classes, return_counts=True), strict=True):
        pool = np.flatnonzero(real_classes == name)
        chosen.append(rng.choice(pool, min(len(pool), per_synthetic * count), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, int)


def realism(
    real: np.ndarray,
    real_classes: np.ndarray,
    synthetic: np.ndarray,
    synthetic_classes: np.ndarray,
    settings: Mapping,
    *,
    groups: Sequence[str],
    min_images: int,
    device="cpu",
) -> tuple[list[dict], dict]:
    """Quality rows (metric, class, value, n_real, n_synthetic, status, note) of one synthetic set
    against real images drawn for it (matched_real already applied), for 'all' and each of
    `groups`, and the per-image measures {laplacian_variance, high_frequency_share, spectrum,
    p_synthetic, p_linear, p_cnn} over real then synthetic images."""
    s = settings
    images = np.concatenate([real, synthetic])
    classes = np.concatenate([real_classes, synthetic_classes])
    measures = image_measures(images)
    test = two_sample_test(
        real, synthetic, s, seed=s["seed"], device=device, features=texture_statistics(images, measures)
    )
    sharpness, share = measures["laplacian_variance"], measures["high_frequency_share"]
    frequencies, spectrum = measures["frequencies"], measures["spectrum"]
    rows = []
    for group in ["all", *groups]:
        members = np.ones(len(images), bool) if group == "all" else classes == group
        is_real, is_syn = members & ~test.synthetic, members & test.synthetic
        n_r, n_s = int(is_real.sum()), int(is_syn.sum())
        row = {
            "class": group,
            "n_real": n_r,
            "n_synthetic": n_s,
            "status": "ok",
            "note": "",
            "extractor": "C2ST: texture statistics + pixel CNN, out of fold",
        }
        if min(n_r, n_s) < min_images:
            note = f"class {group}: {n_r} real and {n_s} synthetic images, fewer than realism.min_images={min_images}"
            rows += [row | {"metric": m, "value": math.nan, "status": "skipped", "note": note} for m in ROW_METRICS]
            continue
        value = test.auc(members)
        low, high = test.interval(s["confidence"], members)
        note = (
            f"{s['confidence']:.0%} interval [{low:.3f}, {high:.3f}] over {len(test.fold_aucs(members))} folds; "
            f"texture-statistics learner alone {test.auc(members, test.linear):.3f}, pixel CNN alone "
            f"{test.auc(members, test.cnn):.3f}"
        )
        rows += [
            row | {"metric": "c2st_auc", "value": value, "note": note},
            row | {"metric": "c2st_low", "value": low},
            row | {"metric": "c2st_high", "value": high},
            row
            | {
                "metric": "laplacian_ratio",
                "value": float(np.median(sharpness[is_syn]) / max(np.median(sharpness[is_real]), 1e-12)),
                "note": f"median Laplacian variance synthetic {np.median(sharpness[is_syn]):.0f}, real {np.median(sharpness[is_real]):.0f}",
                "extractor": "grey 3x3 Laplacian",
            },
            row
            | {
                "metric": "high_frequency_ratio",
                "value": float(np.median(share[is_syn]) / max(np.median(share[is_real]), 1e-12)),
                "note": f"median share of power above {HIGH_FREQUENCY} cycles/px: synthetic {np.median(share[is_syn]):.4f}, "
                f"real {np.median(share[is_real]):.4f}",
                "extractor": "radially averaged power spectrum",
            },
        ]
    per_image = {
        "laplacian_variance": sharpness,
        "high_frequency_share": share,
        "spectrum": list(spectrum),
        "p_synthetic": test.probability,
        "p_linear": test.linear,
        "p_cnn": test.cnn,
        "frequencies": frequencies,
    }
    return rows, per_image


def realism_stage(
    real_indexes: Sequence, manifest, *, mode: str, table_out, images_out, figure_out, config: Mapping
) -> pd.DataFrame:
    """Entry of rule realism: one synthetic set (manifest path) against the real training patches
    (patch indexes). Writes the quality rows (histosynth.evaluation.quality.COLUMNS) to
    `table_out`, the per-image measures (IMAGE_COLUMNS, real and synthetic) to `images_out` and the
    realism figure (histosynth.evaluation.realism_figure) to `figure_out`."""
    import pandas as pd

    from histosynth.data.io import read_file_table, read_patch_index, read_rgb, write_table
    from histosynth.device import pick_device
    from histosynth.evaluation.quality import COLUMNS, image_classes
    from histosynth.evaluation.realism_figure import plot_realism

    s = config["realism"]
    real = pd.concat([read_patch_index(p) for p in real_indexes], ignore_index=True)
    real = real[real["split"] == "train"].reset_index(drop=True) if "split" in real else real
    synthetic = read_file_table(manifest)
    if len(synthetic) > s["max_images"]:
        synthetic = synthetic.sample(s["max_images"], random_state=derive_seed(s["seed"], "synthetic", mode) % 2**32)
    synthetic = synthetic.reset_index(drop=True)
    real_classes, syn_classes = image_classes(real, config["labels"]), image_classes(synthetic, config["labels"])
    real = real.iloc[
        matched_real(real_classes, syn_classes, s["real_per_synthetic"], derive_seed(s["seed"], "real", mode))
    ]
    real_classes = image_classes(real, config["labels"])
    log.info(
        "%s: %d synthetic images against %d real training patches of the same classes", mode, len(synthetic), len(real)
    )
    real_images = np.stack([read_rgb(p) for p in real["image"]]) if len(real) else np.empty((0, 1, 1, 3), np.uint8)
    syn_images = (
        np.stack([read_rgb(p) for p in synthetic["image"]]) if len(synthetic) else np.empty((0, 1, 1, 3), np.uint8)
    )
    base = {"set": mode, "status": "ok", "note": ""}
    if min(len(real), len(synthetic)) < max(2, s["folds"]) or real_images.shape[1:] != syn_images.shape[1:]:
        why = (
            f"synthetic images are {syn_images.shape[1:3]} px, real patches {real_images.shape[1:3]}: no comparison "
            "of images of different sizes"
            if min(len(real), len(synthetic)) >= 2
            else f"{len(real)} real and {len(synthetic)} synthetic images, fewer than realism.folds={s['folds']}"
        )
        log.warning("%s: realism skipped: %s", mode, why)
        rows = [
            base
            | {
                "metric": m,
                "class": "all",
                "value": math.nan,
                "n_real": len(real),
                "n_synthetic": len(synthetic),
                "status": "skipped",
                "note": why,
                "extractor": "",
            }
            for m in ROW_METRICS
        ]
        table = pd.DataFrame(rows, columns=COLUMNS)
        write_table(table, table_out)
        write_table(pd.DataFrame(columns=IMAGE_COLUMNS), images_out)
        plot_realism(pd.DataFrame(columns=IMAGE_COLUMNS), table, [], figure_out, images={})
        return table
    groups = [c for c in config["labels"]["classes"] if (syn_classes == c).any()]
    rows, measures = realism(
        real_images,
        real_classes,
        syn_images,
        syn_classes,
        s,
        groups=groups,
        min_images=s["min_images"],
        device=pick_device(s["device"]),
    )
    table = pd.DataFrame([base | row for row in rows], columns=COLUMNS)
    write_table(table, table_out)
    frequencies = measures.pop("frequencies")
    per_image = pd.DataFrame(
        {
            "set": mode,
            "kind": ["real"] * len(real) + ["synthetic"] * len(synthetic),
            "id": [*real["patch_id"].astype(str), *synthetic["id"].astype(str)],
            "class": [*real_classes, *syn_classes],
            **measures,
        }
    ).reindex(columns=IMAGE_COLUMNS)
    write_table(per_image, images_out)
    shown = per_image[per_image["kind"] == "synthetic"].sort_values("p_synthetic")
    picks = pd.concat([shown.head(FIGURE_IMAGES), shown.tail(FIGURE_IMAGES)]).drop_duplicates("id")
    position = {name: k for k, name in enumerate(synthetic["id"].astype(str))}
    plot_realism(per_image, table, frequencies, figure_out, images={i: syn_images[position[i]] for i in picks["id"]})
    return table


FIGURE_IMAGES = 6  # most and least realistic synthetic images drawn in the figure
