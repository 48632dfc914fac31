r"""Divergences between a teacher distribution p and a student distribution q, one value per row.

Every function is pure: it takes normalized log-probabilities ``lp`` (teacher) and ``lq`` (student) of
shape (..., C) over the same support (full vocabulary or a top-K subset) and returns shape (...).
Temperature, top-K and masking are applied by the caller (see :mod:`kd_plugin.signals`).

:func:`full_vocab_divergence` is the memory-lean path over the full vocabulary: masking, temperature and
the divergence in row chunks, recomputed in backward (analytic gradient for forward KL, the common case).

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

CHUNK_ELEMENTS = 1 << 20  # rows x vocab per chunk of full_vocab_divergence (4 MiB of float32)


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


def _tempered(lprobs, temperature):
    """log_softmax(lprobs / T) in (at least) float32; log-probs are used as they are at T = 1."""
    x = lprobs.to(torch.promote_types(lprobs.dtype, torch.float32))
    return x if temperature == 1 else F.log_softmax(x / temperature, dim=-1)


def _chunks(n, v):
    """Row ranges of about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, v))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _forward_kl_rows(lp, lq):
    """KL(p||q) = p . (lp - lq) per row (one product, no mask); rows where 0 * (log 0 - log q) made a NaN
    are redone with 0 log 0 = 0 (:func:`_kl`)."""
    out = torch.linalg.vecdot(lp.exp(), lp - lq)
    bad = out.isnan().nonzero().squeeze(1)
    if len(bad):
        out[bad] = _kl(lp[bad], lq[bad])
    return out


class _ChunkedDivergence(torch.autograd.Function):
    r"""D(p_T || q_T) row by row over contiguous chunks of an (R x V) pair of log-prob tensors. Saves only
    references to its inputs; backward recomputes each chunk: analytically for forward KL,

        d KL(p_T || q_T) / d lq = (q_T - p_T) / T      (lq: the student log-probs, before the / T)
    and with autograd on the chunk otherwise. Every row is computed (views, no gather copy); the values
    of ``rows`` are returned and the other rows get an exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, lq, lp, rows, temperature, divergence, kwargs):
        analytic = divergence is forward_kl
        out = torch.empty(lq.size(0), dtype=torch.promote_types(lq.dtype, torch.float32), device=lq.device)
        for c in _chunks(lq.size(0), lq.size(-1)):
            t_lp, t_lq = _tempered(lp[c], temperature), _tempered(lq[c], temperature)
            out[c] = _forward_kl_rows(t_lp, t_lq) if analytic else divergence(t_lp, t_lq, **kwargs)
        ctx.save_for_backward(lq, lp, rows)
        ctx.args = temperature, divergence, kwargs
        return out.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad_out):
        lq, lp, rows = ctx.saved_tensors
        t, divergence, kwargs = ctx.args
        scale = grad_out.new_zeros(lq.size(0)).index_copy_(0, rows, grad_out)  # dL/dD per row
        grad = torch.empty(lq.shape, dtype=scale.dtype, device=lq.device)
        for c in _chunks(lq.size(0), lq.size(-1)):
            if divergence is forward_kl:
                torch.exp(_tempered(lq[c], t), out=grad[c]).sub_(_tempered(lp[c], t).exp())
                grad[c].mul_(scale[c].unsqueeze(1) / t)
            else:
                with torch.enable_grad():
                    x = lq[c].detach().requires_grad_()
                    d = divergence(_tempered(lp[c], t), _tempered(x, t), **kwargs)
                    grad[c] = torch.autograd.grad(d, x, scale[c])[0]
        dropped = torch.ones(lq.size(0), dtype=torch.bool, device=lq.device).index_fill_(0, rows, False)
        grad.index_fill_(0, dropped.nonzero().squeeze(1), 0)  # exactly 0, even where a row is not finite
        return grad.to(lq.dtype), None, None, None, None, None


def full_vocab_divergence(divergence, lq, lp, mask, temperature=1.0, **kwargs):
    r"""``divergence``(p_T, q_T) at the ``mask``ed positions over the full vocabulary: the values of
    ``divergence(*aligned_log_probs({"lprobs": lp}, lq, mask, temperature), **kwargs)``, differentiable
    w.r.t. ``lq``, computed in row chunks (forward KL: one fused product, analytic gradient).

    lq / lp: student / teacher log-probabilities (normalized, any float dtype), shape (..., V); mask: (...)
    bool. Returns the N = mask.sum() values in mask order, in float32 (float64 for float64 inputs).
    Memory: no (N x V) intermediate is kept for backward (chunks of rows are recomputed there), so the
    extra peak is the gradient w.r.t. ``lq`` (one tensor of its shape) plus one chunk's temporaries.
    Pass the student's log-probs (not logits): the log_softmax that made them has saved them anyway, and
    its backward turns the gradient w.r.t. the log-probs into the one w.r.t. the logits.
    """
    v = lq.size(-1)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    return _ChunkedDivergence.apply(lq.reshape(-1, v), lp.reshape(-1, v).detach(), rows, float(temperature),
                                    divergence, kwargs)


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
