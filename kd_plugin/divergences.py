r"""Divergences between a teacher distribution p and a student distribution q, one value per row.

Every function is pure: it takes normalized log-probabilities ``lp`` (teacher) and ``lq`` (student) of
shape (..., C) over the same support (full vocabulary or a top-K subset) and returns shape (...).
Temperature, top-K and masking are applied by the caller (see :mod:`kd_plugin.signals`).

    forward_kl       KL(p||q)   = sum_c p_c (log p_c - log q_c)                    (mean-seeking)
    reverse_kl       KL(q||p)   = sum_c q_c (log q_c - log p_c)                    (mode-seeking)
    js               JS_b(p,q)  = b KL(p||m) + (1-b) KL(q||m),  m = b p + (1-b) q  (b = --kd-js-beta)
    tvd              TVD(p,q)   = 1/2 sum_c |p_c - q_c|
    skew_forward_kl  SKL_l(p,q) = KL(p || l p + (1-l) q)                           (l = --kd-skew-lambda)
    skew_reverse_kl  SRKL_l     = KL(q || l q + (1-l) p)
"""
import math

import torch


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
