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
    k = min(ce.numel(), max(1, math.ceil(round(rate * ce.numel(), 6))))  # 0.07 * 100 = 7.000000000000001
    mask = torch.zeros_like(ce, dtype=torch.bool)
    mask[ce.topk(k).indices] = True
    return mask


class GlobalCEQueue(nn.Module):
    """FIFO queue of recent token cross-entropies.

    Its state is buffers (float32 even under --fp16/--bf16); kd_plugin.fairseq_patches.criterion_state saves
    and restores them with fairseq checkpoints. On an empty queue (evaluation before any training step) selection falls
    back to the batch's own top-r.
    """

    def __init__(self, size):
        super().__init__()
        self.register_buffer("values", torch.zeros(size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # values pushed (capped per push)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.values = self.values.float()  # criterion.half() must not turn the queue into fp16
        return self

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
        if self.count.item() == 0:
            return select_batch(ce.flatten(), rate).view_as(ce)
        return ce >= self.threshold(rate).to(ce.device)
