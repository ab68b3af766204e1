"""Distribution scores of image sets: the Fréchet distance and KID of feature sets (any feature
space), the Inception Score, and the pretrained networks behind FID/KID/IS and LPIPS diversity.

- FID/KID/IS: torch-fidelity's InceptionV3 (the 2015-12-05 TF weights every FID paper uses), one
  pass per image giving pool features (quality.feature: 64/192/768/2048) and unbiased logits.
  FID is the closed form on the features' Gaussians (fid_from_features, float64); KID the unbiased
  polynomial-kernel MMD averaged over random subsets (torchmetrics' poly_mmd); IS on the synthetic
  images' logits in splits (torchmetrics' formula).
- LPIPS diversity: mean LPIPS (torchmetrics' AlexNet LPIPS; its linear layers ship with
  torchmetrics, the AlexNet backbone is torchvision's ImageNet file) over random pairs of distinct
  images; higher = more diverse. Images under 64 px are upsampled to 64 for AlexNet.
"""


from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from histosynth.data.io import read_rgb
from histosynth.weights import WEIGHTS

LPIPS_MIN_SIDE = 64



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


def kid(real: np.ndarray, synthetic: np.ndarray, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
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


def inception_score(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
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

def load_inception(path: str | Path, feature: int):
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
def inception_embeddings(images: torch.Tensor, net, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) float64 arrays of uint8 (N, 3, H, W) images (one batch)."""
    device = device or next(net.parameters()).device
    features, logits = net.to(device)(images.to(device))
    return features.double().cpu().numpy(), logits.double().cpu().numpy()


def inception_features(paths: Sequence[str | Path], net, batch_size: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) float64 arrays for the images at `paths`."""
    device = device or torch.device("cpu")
    chunks = [inception_embeddings(read_images(paths[start:start + batch_size]), net, device)
              for start in range(0, len(paths), batch_size)]
    if not chunks:
        return np.empty((0, 0)), np.empty((0, 0))
    return np.concatenate([f for f, _ in chunks]), np.concatenate([lg for _, lg in chunks])


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
def lpips_diversity(paths: Sequence[str | Path], net, pairs: int, seed: int, batch_size: int, device=None) -> float:
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


