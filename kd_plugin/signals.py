r"""Teacher signals as the task hands them to the criterions, and their alignment with the student.

``sample["teacher"]`` (token-level signal, aligned with ``sample["target"]``, B x T positions) is either
    {"lprobs": B x T x V}                                  full teacher log-probabilities at T=1, or
    {"topk_lprobs": B x T x K, "topk_ids": B x T x K}      the teacher's K most likely tokens, sorted,
                                                           with their (un-renormalized) T=1 log-probs.
Online teachers produce either form (top-K when the criterion asks for it); the offline cache produces
the second. ``sample["teacher_target"]`` / ``sample["teacher_net_input"]`` carry teacher-decoded targets.

Temperature on a top-K signal re-softmaxes the stored log-probs over the K ids:
    p^T_k = softmax_k(log p_k / T),   q^T_k = softmax_k(z_k / T)   (z = student logits at the same ids)
For a single teacher this equals the tempered teacher distribution restricted to its top-K and
renormalized, exactly; K = V recovers the full-vocabulary divergence.
"""
import torch.nn.functional as F

TEACHER = "teacher"
TEACHER_TARGET = "teacher_target"
TEACHER_NET_INPUT = "teacher_net_input"


def topk_signal(lprobs, k):
    """Full teacher log-probs (..., V) -> the top-K form (sorted, descending)."""
    values, ids = lprobs.topk(k, dim=-1)
    return {"topk_lprobs": values, "topk_ids": ids}


def signal_topk(teacher):
    """K of a top-K signal, or 0 for a full-vocabulary one."""
    return teacher["topk_ids"].size(-1) if "topk_ids" in teacher else 0


def aligned_log_probs(teacher, student_logits, mask, temperature=1.0, topk=0):
    """Teacher and student log-probs at ``temperature`` over a common support, for masked positions.

    teacher: a signal dict (see module doc) with B x T leading dims; student_logits: B x T x V;
    mask: B x T bool (True = real target token). topk = 0 uses the signal as it is; topk = k > 0
    keeps the teacher's k most likely tokens (an error if the signal holds fewer).
    Returns (lp, lq), each N x C with N = mask.sum(): C = V (full) or the K kept ids.
    """
    have = signal_topk(teacher)
    if topk and have and topk > have:
        raise ValueError("--kd-topk %d exceeds the teacher signal's K=%d (offline cache)" % (topk, have))
    if have or topk:  # gather the K ids before masking: no (N x V) copy
        if have:
            t_lp, ids = teacher["topk_lprobs"], teacher["topk_ids"]
            if topk:
                t_lp, ids = t_lp[..., :topk], ids[..., :topk]
        else:
            t_lp, ids = teacher["lprobs"].topk(topk, dim=-1)
        logits, t_lp = student_logits.gather(-1, ids.long())[mask], t_lp[mask]
    else:
        logits, t_lp = student_logits[mask], teacher["lprobs"][mask]
    return _log_softmax(t_lp, temperature), _log_softmax(logits, temperature)


def _log_softmax(x, temperature):
    """log_softmax(x / T) in float32 (no division at T = 1)."""
    x = x.float()
    return F.log_softmax(x if temperature == 1 else x / temperature, dim=-1)
