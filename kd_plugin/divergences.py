r"""Divergences between a teacher distribution p and a student distribution q, one value per row.

Every function is pure: it takes normalized log-probabilities ``lp`` (teacher) and ``lq`` (student) of
shape (..., C) over the same support (full vocabulary or a top-K subset) and returns shape (...).
Temperature, top-K and masking are applied by the caller (see :mod:`kd_plugin.signals`).

:func:`fused_forward_kl` is the memory-lean path of the common case (forward KL over the full vocabulary):
masking, temperature and the divergence in row chunks, with an analytic backward (see its doc).

    forward_kl       KL(p||q)   = sum_c p_c (log p_c - log q_c)                    (mean-seeking)
    reverse_kl       KL(q||p)   = sum_c q_c (log q_c - log p_c)                    (mode-seeking)
    js               JS_b(p,q)  = b KL(p||m) + (1-b) KL(q||m),  m = b p + (1-b) q  (b = --kd-js-beta)
    tvd              TVD(p,q)   = 1/2 sum_c |p_c - q_c|
    skew_forward_kl  SKL_l(p,q) = KL(p || l p + (1-l) q)                           (l = --kd-skew-lambda)
    skew_reverse_kl  SRKL_l     = KL(q || l q + (1-l) p)
"""
import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 21  # rows x vocab per chunk of fused_forward_kl (8 MiB of float32)


def _kl(lp, lq):
    """KL(p||q) from log-probs, with 0 log 0 = 0 where p underflows to exactly 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), p.new_zeros(())).sum(-1)


def _log_mix(la, lb, weight_a):
    """log(w a + (1-w) b) computed from log a, log b."""
    log_w = math.log(weight_a) if weight_a > 0 else float("-inf")
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else float("-inf")
    return torch.logaddexp(la + log_w, lb + log_1mw)


def forward_kl(lp, lq, **_):
    return _kl(lp, lq)


def reverse_kl(lp, lq, **_):
    return _kl(lq, lp)


def js(lp, lq, js_beta=0.5, **_):
    lm = _log_mix(lp, lq, js_beta)
    return js_beta * _kl(lp, lm) + (1.0 - js_beta) * _kl(lq, lm)


def tvd(lp, lq, **_):
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


def skew_forward_kl(lp, lq, skew_lambda=0.1, **_):
    return _kl(lp, _log_mix(lp, lq, skew_lambda))


def skew_reverse_kl(lp, lq, skew_lambda=0.1, **_):
    return _kl(lq, _log_mix(lq, lp, skew_lambda))


def _tempered(lprobs, rows, temperature):
    """log_softmax(lprobs[rows] / T) in (at least) float32; log-probs are used as they are at T = 1."""
    x = lprobs.index_select(0, rows)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x if temperature == 1 else F.log_softmax(x / temperature, dim=-1)


class _FusedForwardKL(torch.autograd.Function):
    r"""KL(p_T || q_T) of the selected rows; saves only references to its inputs and recomputes in backward.

        d KL(p_T || q_T) / d lq = (q_T - p_T) / T      (lq: the student log-probs, before the / T)
    """

    @staticmethod
    def forward(ctx, lq, lp, rows, temperature):
        chunk = max(1, CHUNK_ELEMENTS // max(1, lq.size(-1)))
        out = torch.empty(len(rows), dtype=torch.promote_types(lq.dtype, torch.float32), device=lq.device)
        for i in range(0, len(rows), chunk):
            r = rows[i: i + chunk]
            out[i: i + chunk] = _kl(_tempered(lp, r, temperature), _tempered(lq, r, temperature))
        ctx.save_for_backward(lq, lp, rows)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lq, lp, rows = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.zeros_like(lq)
        for i in range(0, len(rows), chunk):
            r = rows[i: i + chunk]
            g = (_tempered(lq, r, t).exp_() - _tempered(lp, r, t).exp_()).mul_(grad_out[i: i + chunk, None] / t)
            grad.index_copy_(0, r, g.to(grad.dtype))
        return grad, None, None, None


def fused_forward_kl(lq, lp, mask, temperature=1.0):
    r"""KL(p_T || q_T) at the ``mask``ed positions, full vocabulary: the same values as
    ``forward_kl(*aligned_log_probs({"lprobs": lp}, lq, mask, temperature))``, differentiable w.r.t. ``lq``.

    lq / lp: student / teacher log-probabilities (normalized, any float dtype), shape (..., V); mask: (...)
    bool. Returns the N = mask.sum() values in mask order, in float32 (float64 for float64 inputs).
    Memory: neither the masked rows nor any (N x V) intermediate is kept for backward; each chunk of
    rows is recomputed there, so the extra peak is the gradient w.r.t. ``lq`` (one tensor of its shape).
    Pass the student's log-probs (not logits): the log_softmax that made them has saved them anyway,
    and the gradient (q_T - p_T) / T sums to 0 over V, so it passes that log_softmax unchanged.
    """
    v = lq.size(-1)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return _FusedForwardKL.apply(lq.reshape(-1, v), lp.reshape(-1, v).detach(), rows, float(temperature))


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": js,
    "tvd": tvd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


def get_divergence(name):
    """The divergence function called ``name``; a clear error naming --kd-divergence otherwise."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            "--kd-divergence: unknown divergence %r (choose from %s)" % (name, ", ".join(DIVERGENCES))
        ) from None
