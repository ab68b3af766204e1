"""Distances between two sets of image features (any feature space): the Fréchet distance of their
Gaussians and KID, and the Inception Score of one set's logits, all in float64.

FID is the closed form on the features' Gaussians; KID the unbiased polynomial-kernel MMD averaged
over random subsets (torchmetrics' poly_mmd); IS on logits in splits (torchmetrics' formula)."""

from __future__ import annotations

import numpy as np
import torch


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
    scores = [
        poly_mmd(
            real_t[torch.randperm(len(real_t), generator=generator)[:size]],
            syn_t[torch.randperm(len(syn_t), generator=generator)[:size]],
        )
        for _ in range(subsets)
    ]
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
