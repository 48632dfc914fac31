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
   zero (g = 1/2), and --kd-gate-warmup N keeps the mix at 1/2 for the first N updates.

4. optionally adds a global logit b moved by a learning-progress controller (``--kd-gate global`` or
   ``sentence+global``), so the mix can leave 1/2 at the corpus level: g(x) = sigmoid(b + z(x)) with
       b <- clip(b + eta (rho_tok - rho_sent), -B, B),   rho = log(E_slow[d] / E[d])
   after every training batch, E_slow a running mean with momentum 0.999 (E: --kd-gate-momentum). rho is how
   fast a loss has fallen lately (0 on a plateau); the weight moves towards the signal the student is still
   learning from faster, as learning-progress curricula do (Graves et al. 2017; DistiLLM's adaptive schedule
   steers by validation-loss progress in the same spirit). b is a buffer, not a parameter: no gradient
   reaches it, so the loss magnitudes cannot collapse it; |b| <= B keeps both signals in the mix.

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


class ScalarGate(nn.Module):
    """One learnable logit shared by every sentence."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(()))

    def forward(self, states, padding_mask):
        return self.logit.expand(states.size(1))


class FixedGate(nn.Module):
    """A constant gate value (no parameters)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, states, padding_mask):
        return None


class SampledGate(FixedGate):
    """``sample:<v>``: in training each sentence draws g(x) ~ Bernoulli(v) and the student runs on that one
    prefix (a B-row pass instead of 2B: E[loss] is fixed:v's); validation uses the exact fixed:v mix."""


class ShiftedGate(nn.Module):
    """z(x) + b: a trained per-sentence gate plus the global controller's final logit (``sentence+global``)."""

    def __init__(self, gate, shift):
        super().__init__()
        self.gate, self.shift = gate, float(shift)

    def forward(self, states, padding_mask):
        return self.gate(states, padding_mask) + self.shift


def build_gate(spec, dim, hidden=64):
    """``sentence`` | ``scalar`` | ``fixed:<value in [0, 1]>`` | ``sample:<value>`` -> the per-sentence module; ``global`` ->
    FixedGate(0.5) (the controller's b alone), ``sentence+global`` -> the sentence gate (b added by the
    criterion, see :func:`uses_global`)."""
    if spec == "global":
        return FixedGate(0.5)
    if spec in ("sentence", "sentence+global"):
        if not dim:
            raise ValueError("--kd-gate sentence needs the student's encoder dimension (encoder_embed_dim)")
        return SentenceGate(dim, hidden)
    if spec == "scalar":
        return ScalarGate()
    for prefix, cls in (("fixed:", FixedGate), ("sample:", SampledGate)):
        if spec.startswith(prefix):
            try:
                value = float(spec[len(prefix):])
            except ValueError:
                value = -1.0
            if 0.0 <= value <= 1.0:
                return cls(value)
    raise ValueError("--kd-gate must be sentence, scalar, global, sentence+global, fixed:<value in [0, 1]> or "
                     "sample:<value in [0, 1]>; got %r" % spec)


def uses_global(spec):
    """Whether ``--kd-gate spec`` adds the global controller's logit b."""
    return spec in ("global", "sentence+global")


def progress_step(logit, fast, slow, rate, bound):
    """b + rate (log(slow_tok / fast_tok) - log(slow_sent / fast_sent)), clipped to [-bound, bound];
    fast, slow: (tok, sent) running means (float64 scalars)."""
    rho_tok = torch.log(slow[0].clamp(min=1e-6) / fast[0].clamp(min=1e-6))
    rho_sent = torch.log(slow[1].clamp(min=1e-6) / fast[1].clamp(min=1e-6))
    return (logit + rate * (rho_tok - rho_sent)).clamp(-bound, bound)


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
    running means stay float32 whatever the criterion's dtype (see :meth:`_apply`). With ``global_rate`` set
    it also keeps slow running means and the global controller's logit b (:func:`progress_step`), updated from
    the same all-reduced statistics, so every worker holds the same b.
    """

    SLOW_MOMENTUM = 0.999

    def __init__(self, tau=1.0, momentum=0.99, global_rate=None, global_bound=2.0):
        super().__init__()
        self.tau, self.momentum = tau, momentum
        self.register_buffer("mean_tok", torch.zeros(()))
        self.register_buffer("mean_sent", torch.zeros(()))
        self.global_rate, self.global_bound = global_rate, global_bound
        if global_rate is not None:  # the global controller's state (absent otherwise: older checkpoints load)
            self.register_buffer("slow_tok", torch.zeros(()))
            self.register_buffer("slow_sent", torch.zeros(()))
            self.register_buffer("global_logit", torch.zeros(()))

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
            pairs = [(self.mean_tok, s_tok, self.momentum), (self.mean_sent, s_sent, self.momentum)]
            if self.global_rate is not None:
                pairs += [(self.slow_tok, s_tok, self.SLOW_MOMENTUM), (self.slow_sent, s_sent, self.SLOW_MOMENTUM)]
            for buf, total, momentum in pairs:
                m = (total / n).to(buf)
                buf.copy_(m if buf.item() == 0 else momentum * buf + (1 - momentum) * m)
            if self.global_rate is not None:
                self.global_logit.copy_(progress_step(
                    self.global_logit.double(), (self.mean_tok.double(), self.mean_sent.double()),
                    (self.slow_tok.double(), self.slow_sent.double()), self.global_rate, self.global_bound))
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
