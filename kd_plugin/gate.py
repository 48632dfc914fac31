r"""The per-sentence gate of ``hybrid_kd`` and the signal it is trained on.

Mixing, per source sentence x:  L(x) = g(x) L_token(x) + (1 - g(x)) L_sentence(x).

Why not learn g by descending L itself: dL/dg = L_token - L_sentence, so plain gradient descent pushes
g to 0 or 1 towards whichever loss is numerically smaller. The two losses live on different scales
(a divergence to a soft distribution vs. an NLL of a one-hot sequence), so this measures units, not
which teacher signal helps: the gate collapses. Our design therefore

1. stops that gradient: L uses g(x) detached, so the loss magnitudes never train the gate;
2. trains the gate on a bounded, scale-free *benefit* signal, by binary cross-entropy to the target
       t(x) = sigmoid(z(x) / tau),   z = standardize over the batch of  r_sent(x) - r_tok(x),
       r_tok(x)  = d_tok(x)  / E[d_tok],   d_tok  = mean over x's tokens of T^2 D(p_T || q_T),
       r_sent(x) = d_sent(x) / E[d_sent], d_sent = mean over x's teacher-target tokens of NLL,
   with E[.] running means (so both ratios are ~1 on average, whatever their units). r_tok(x) > r_sent(x)
   means the student finds the teacher's full distribution on x relatively harder to match than the
   teacher's single output: x is "complex" for this student and leans to sentence-level KD, as the
   paper's finding suggests; the reverse leans to token-level KD. The target is relative (standardized
   within the batch), so its mean stays at ~1/2 and it cannot drive every sentence to one side; its
   spread does not depend on how much the raw ratios vary (tau sets it: std(t) ~ 0.2 at tau = 1).
   The gate therefore *reallocates* between the two signals per sentence around an even mix; it does
   not learn a global preference for one of them (a limitation, see docs/GATE.md);
3. predicts g(x) from the input alone (masked mean of the student's encoder states, detached, plus
   log length), so the gate generalizes the benefit signal to a function of x. The last layer starts at
   zero (g = 1/2).

The gate is never used at inference: it lives in the criterion (saved in the checkpoint's "criterion"
entry, optimized with the model) and the student decodes with stock fairseq-generate.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class SentenceGate(nn.Module):
    """z(x) = w2 . tanh(W1 [LN(mean_t h_t(x)); log(1 + |x|)] + b1) + b2."""

    def __init__(self, dim, hidden=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.hidden = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, states, padding_mask):
        """states: T x B x C encoder output; padding_mask: B x T (True = pad) or None -> B logits."""
        keep = states.new_ones(states.shape[:2]) if padding_mask is None else (~padding_mask).t().to(states)
        length = keep.sum(0).clamp(min=1)
        pooled = (states * keep.unsqueeze(-1)).sum(0) / length.unsqueeze(-1)
        feats = torch.cat([self.norm(pooled.detach()), torch.log1p(length).unsqueeze(-1)], -1)
        return self.out(torch.tanh(self.hidden(feats))).squeeze(-1)


class FixedGate(nn.Module):
    """A constant gate value (no parameters)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, states, padding_mask):
        return None


def build_gate(spec, dim, hidden=64):
    """``sentence`` -> the learned per-sentence gate, ``fixed:<value in [0, 1]>`` -> a constant; anything else
    -> ValueError naming --kd-gate. (Retired values are refused before, where fairseq reads the configuration:
    kd_plugin.fairseq_patches.retired_modes.)"""
    if spec == "sentence":
        if not dim:
            raise ValueError("--kd-gate sentence needs the student's encoder dimension (encoder_embed_dim)")
        return SentenceGate(dim, hidden)
    if spec.startswith("fixed:"):
        try:
            value = float(spec[len("fixed:"):])
        except ValueError:
            value = -1.0
        if 0.0 <= value <= 1.0:
            return FixedGate(value)
    raise ValueError("--kd-gate must be fixed:<value in [0, 1]> or sentence; got %r" % spec)


def _moments(d_tok, d_sent, reduce):
    """float64 [n, sum a, sum b, sum a^2, sum b^2, sum ab] of a = d_sent, b = d_tok; summed over every
    data-parallel worker when ``reduce`` and torch.distributed runs with more than one process."""
    a, b = d_sent.double(), d_tok.double()
    m = torch.stack([a.new_tensor(float(a.numel())), a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(m)
    return m


class BenefitTarget(nn.Module):
    """t(x) = sigmoid(standardize(d_sent(x)/E[d_sent] - d_tok(x)/E[d_tok]) / tau), running means as buffers.

    Under data-parallel training (``update=True`` with torch.distributed initialized) the running means and
    the standardization use the statistics of ALL workers' batches (one all-reduce of six numbers), so N
    workers with batches of B sentences compute the targets one worker would compute on their union. The
    running means stay float32 whatever the criterion's dtype (see :meth:`_apply`).
    """

    def __init__(self, tau=1.0, momentum=0.99):
        super().__init__()
        self.tau, self.momentum = tau, momentum
        self.register_buffer("mean_tok", torch.zeros(()))
        self.register_buffer("mean_sent", torch.zeros(()))

    def _apply(self, fn, *args, **kwargs):
        """Device moves apply, dtype casts do not: under --fp16/--bf16 fairseq halves the criterion, and a
        half-precision running mean would round a 1% momentum step away (bf16 spacing near 3 is 0.016)."""
        kept = dict(self._buffers)
        super()._apply(fn, *args, **kwargs)
        for name, old in kept.items():
            self._buffers[name] = old.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def forward(self, d_tok, d_sent, update=True):
        n, s_sent, s_tok, ss_sent, ss_tok, s_cross = _moments(d_tok, d_sent, update)
        if update:
            for buf, total in ((self.mean_tok, s_tok), (self.mean_sent, s_sent)):
                m = (total / n).to(buf)
                buf.copy_(m if buf.item() == 0 else self.momentum * buf + (1 - self.momentum) * m)
        inv_s = 1.0 / self.mean_sent.double().clamp(min=1e-6)
        inv_t = 1.0 / self.mean_tok.double().clamp(min=1e-6)
        diff = d_sent.double() * inv_s - d_tok.double() * inv_t
        if n < 2:
            return torch.full_like(d_tok, 0.5, dtype=torch.float32)
        mean = (s_sent * inv_s - s_tok * inv_t) / n
        sq = ss_sent * inv_s ** 2 - 2 * s_cross * inv_s * inv_t + ss_tok * inv_t ** 2
        std = ((sq - n * mean * mean).clamp(min=0) / (n - 1)).sqrt()
        return torch.sigmoid((diff - mean) / (std + 1e-6) / self.tau).float()


def gate_loss(logits, target):
    """Sum over sentences of BCE(sigmoid(logit), target)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
