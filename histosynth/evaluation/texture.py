"""Per-image sharpness, power spectrum and texture statistics of RGB patches, with no learning.

The variance of the Laplacian of the grey image (0-255 scale; blur lowers it), the radially
averaged power spectrum (Hann-windowed, mean removed), and its high-frequency share, the power
above a quarter of the sampling frequency over the total; texture_statistics adds colour moments
and the spectral shape for the linear learner of the two-sample test
(histosynth.evaluation.two_sample).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

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
