r"""Teacher signals as the task hands them to the criterions, and their alignment with the student.

``sample[TEACHER]`` (token-level signal, aligned with ``sample["target"]``, B x T positions) is either
    {"lprobs": B x T x V}       full teacher log-probabilities at T=1, or
    {"topk_lprobs": B x T x K, "topk_ids": B x T x K, "topk_rest": B x T}
                                the teacher's K most likely tokens, sorted, with their T=1 log-probs (NOT
                                renormalized), and log(1 - sum_k p_k), the log-mass outside them (-inf for K = V).
Online teachers produce either form (top-K when the criterion asks for it); the offline cache produces
the second (fp16 values, the rest clamped to the fp16 range). ``sample[TEACHER_TARGET]`` /
``sample[TEACHER_NET_INPUT]`` carry teacher-decoded targets. The keys are defined in kd_plugin.needs.

Top-K KD compares two distributions over K+1 bins: the teacher's K ids and one bin for all other tokens,
    p = (p_1 .. p_K, p_rest),   p_rest = 1 - sum_k p_k      (teacher, T=1, as stored / computed)
    q = (q_1 .. q_K, q_rest),   q_rest = 1 - sum_k q_k      (q_k: the student's FULL softmax at id_k)
so the KD term also pushes down the student's mass outside the teacher's top-K (renormalizing teacher and
student over the K ids alone never does). Temperature tempers the bin distributions, the rest bin acting
as one pseudo-token:
    p^T = softmax(log p / T),   q^T = softmax(log q / T)      (over the K+1 bins)
Exact at T = 1; K = V has no rest bin and gives the full-vocabulary divergence at every T. For T != 1 and
K < V it approximates tempering the full distributions: tempering the rest's tokens one by one would give
the rest bin sum_{v outside} p_v^(1/T), not (sum_{v outside} p_v)^(1/T) (up to normalization).
Numerics: log q_rest = log1mexp(logsumexp_k log q_k) (no V-sized copy) resolves the student's rest mass
down to about the float32 eps (1.2e-7); below it q_rest is taken as min(eps, p_rest) (a bin empty for both
contributes 0). The teacher's rest log-mass is floored at the fp16 minimum (what the cache stores). Every
value and gradient is finite.
"""
import math

import torch
import torch.nn.functional as F

REST_FLOOR = float(torch.finfo(torch.float16).min)  # floor of the teacher's rest log-mass (the cache's range)
_LOG_HALF = math.log(0.5)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate both near 0 and for x -> -inf (Maechler 2012):
    log(-expm1(x)) for x > -log 2, log1p(-exp(x)) below."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_signal(lprobs, k):
    """Full teacher log-probs (..., V) -> the top-K form (sorted, descending). The rest log-mass is the
    logsumexp over the tokens outside the top-K (no cancellation in 1 - sum_k p_k; -inf for k = V)."""
    values, ids = lprobs.topk(k, dim=-1)
    rest = lprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return {"topk_lprobs": values, "topk_ids": ids, "topk_rest": rest}


def signal_topk(teacher):
    """K of a top-K signal, or 0 for a full-vocabulary one."""
    return teacher["topk_ids"].size(-1) if "topk_ids" in teacher else 0


def student_rest(lq, teacher_rest):
    """log q_rest = log1mexp(logsumexp_k log q_k) from the student's log-probs (N x K) at the K ids.

    Where sum_k q_k is within eps (of the dtype) of 1, the rest is not resolvable (rounding may even put
    the sum above 1): it is then min(log eps, ``teacher_rest``), so that a bin where both put (numerically)
    no mass contributes exactly 0, and the result is never NaN or -inf (no gradient flows there)."""
    lse = torch.logsumexp(lq, dim=-1)
    eps = torch.finfo(lse.dtype).eps
    floor = teacher_rest.clamp(max=math.log(eps))
    return torch.where(lse < -eps, log1mexp(lse.clamp(max=-eps)), floor)


def aligned_log_probs(teacher, student_lprobs, mask, temperature=1.0, topk=0):
    """Teacher and student log-probs at ``temperature`` over a common support, for masked positions.

    teacher: a signal dict (see module doc) with B x T leading dims; student_lprobs: the student's
    (normalized) log-probs B x T x V; mask: B x T bool (True = real target token). topk = 0 uses the
    signal as it is; topk = k > 0 keeps the teacher's k most likely tokens (an error if the signal holds
    fewer; the dropped ones join the rest). Computed in float32 (float64 for a float64 student).
    Returns (lp, lq), each N x C with N = mask.sum(): C = V (full) or the K+1 bins of the module doc
    (K when K = V: no rest bin).
    """
    have = signal_topk(teacher)
    if topk and have and topk > have:
        raise ValueError("--kd-topk %d exceeds the teacher signal's K=%d (offline cache)" % (topk, have))
    dtype = torch.promote_types(student_lprobs.dtype, torch.float32)
    if not (have or topk):
        lp, lq = teacher["lprobs"][mask].to(dtype), student_lprobs[mask].to(dtype)
    else:
        if not have:
            teacher = topk_signal(teacher["lprobs"], topk)
        k = topk or have
        ids = teacher["topk_ids"][..., :k].long()
        lq = student_lprobs.gather(-1, ids)[mask].to(dtype)  # gather the K ids before masking: no N x V copy
        t_lp = teacher["topk_lprobs"][mask].to(dtype)  # fp16 in the cache: upcast before any arithmetic
        rest = teacher["topk_rest"][mask].to(dtype)
        if k < t_lp.size(-1):  # the signal's ids beyond k join the rest
            rest = torch.logsumexp(torch.cat([rest.unsqueeze(-1), t_lp[:, k:]], -1), dim=-1)
        lp = t_lp[:, :k]
        if k < student_lprobs.size(-1):  # K ids short of the vocabulary: add the rest bin
            rest = rest.clamp(min=REST_FLOOR)
            lp = torch.cat([lp, rest.unsqueeze(-1)], -1)
            lq = torch.cat([lq, student_rest(lq, rest).unsqueeze(-1)], -1)
    return _log_softmax(lp, temperature), _log_softmax(lq, temperature)


def _log_softmax(x, temperature):
    """log_softmax(x / T) (no division at T = 1); also renormalizes rounding (fp16 cache) at T = 1."""
    return F.log_softmax(x if temperature == 1 else x / temperature, dim=-1)
