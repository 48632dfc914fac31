r"""Selective KD (Wang et al., 2021, "Selective Knowledge Distillation for Neural Machine Translation").

KD is applied only to the fraction r of target tokens the student finds hardest, hardness being the
student's cross-entropy on the gold token, ce_i = -log q(y_i):
    batch:  select ce_i among the ceil(r N) largest of the batch;
    global: select ce_i >= the (1 - r) quantile of a FIFO queue of the last Q ce values seen in training.
"""
import math

import torch
import torch.nn as nn


def select_batch(ce, rate):
    """Boolean mask of the ceil(rate * N) largest entries of ``ce`` (N,)."""
    k = min(ce.numel(), max(1, math.ceil(rate * ce.numel())))
    mask = torch.zeros_like(ce, dtype=torch.bool)
    mask[ce.topk(k).indices] = True
    return mask


class GlobalCEQueue(nn.Module):
    """FIFO queue of recent token cross-entropies; its state is a buffer, saved with the criterion."""

    def __init__(self, size):
        super().__init__()
        self.register_buffer("values", torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # total values pushed

    def push(self, ce):
        ce = ce.detach().float().flatten()[-self.values.numel():]
        n, size = ce.numel(), self.values.numel()
        pos = (self.count.item() + torch.arange(n, device=ce.device)) % size
        self.values[pos.to(self.values.device)] = ce.to(self.values.device)
        self.count += n

    def threshold(self, rate):
        filled = self.values[: min(self.count.item(), self.values.numel())]
        return torch.quantile(filled, 1.0 - rate)

    def select(self, ce, rate, update=True):
        if update:
            self.push(ce)
        return ce >= self.threshold(rate).to(ce.device)
