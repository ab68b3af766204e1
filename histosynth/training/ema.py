"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's weights, kept in a frozen copy of the model:
    ema = d * ema + (1 - d) * param after each `update`, with d = decay, or during warm-up
    d = min(decay, (1 + n) / (10 + n)) after n updates. Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for ema, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema.copy_(d * ema + (1 - d) * param.detach())
        for ema, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema.copy_(buffer)
        self.updates += 1
