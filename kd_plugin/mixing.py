r"""Mixing rules of ``hybrid_kd`` on the teacher's prefix: per-token weights in, one loss form.

Every rule (``--kd-mix`` other than ``gate``) trains the student in ONE pass on the teacher-decoded target
y^ (Kim & Rush 2016, "Seq-KD + Word-KD") and returns detached weights w_t in [0, 1] for

    loss(x) = sum_t (1 - w_t) LS-NLL(y^_t) + w_t T^2 D(p_T(. | y^_<t, x) || q_T(. | y^_<t, x))

p = the teacher's distribution on its own prefix (sample["teacher_on_targets"]), q = the student's, D and T
as in token_kd (--kd-divergence, --kd-temperature; K+1 bins for top-K signals, kd_plugin.signals).

    rule        w_t                                                          source
    word        alpha  (--kd-alpha)                                          Kim & Rush 2016, Seq-KD + Word-KD
    confidence  1 - p(y^_t | y^_<t, x)                                       confident tokens learn y^
    entropy     H(p(. | y^_<t, x)) / log V                                   uncertain tokens learn p
    hkd         1[ mean_t log q(y^_t | .) > mean_t log p(y^_t | .) ]  (per sentence)   Lee et al. 2022
    curriculum  g(u) = start + (end - start) min(1, u / ramp)  (u: update)   sentence- to token-heavy

p and q in the weights are the T = 1 distributions (the teacher's own confidence, not a tempered one). With a
top-K signal (--kd-topk, every --teacher-cache) p is known over K+1 bins, the K ids and the rest mass
(kd_plugin.signals): a token outside the K ids gets the rest bin's probability (an upper bound of its own;
y^_t is within the top 2 * beam of its prefix, so K >= 2 * beam never needs it), and the entropy is that of
the K+1 bins (a lower bound of the full entropy), still normalized by log V. ``gate`` (today's two-prefix
mix, kd_plugin.gate) is not a rule of this form and lives in the criterion.

Every function is pure: keyword arguments in (each takes what it needs and ignores the rest), B x T float32
weights out, zero at padding, no gradient.
    mask           B x T bool, real tokens of y^        target          B x T token ids of y^
    teacher        signal dict on y^ (kd_plugin.signals: {"lprobs"} or {"topk_lprobs", "topk_ids", "topk_rest"})
    student_lprob  B x T log q(y^_t) at T = 1           vocab_size      V
    num_updates    u                                   alpha, start, end, ramp: the flags above
"""
import math

import torch

from kd_plugin.signals import REST_FLOOR, TEACHER_ON_TARGETS  # noqa: F401  (the key lives in signals)


def teacher_token_lprob(teacher, target):
    """B x T log p(y^_t | y^_<t, x) (T = 1, float32); top-K: the id's log-prob, or the rest bin's outside the K."""
    if "lprobs" in teacher:
        return teacher["lprobs"].float().gather(-1, target.unsqueeze(-1)).squeeze(-1)
    lp, ids = teacher["topk_lprobs"].float(), teacher["topk_ids"].long()
    hit = ids.eq(target.unsqueeze(-1))
    rest = teacher["topk_rest"].float().clamp(min=REST_FLOOR)
    return torch.where(hit.any(-1), lp.masked_fill(~hit, float("-inf")).logsumexp(-1), rest)


def teacher_entropy(teacher):
    """B x T entropy of p(. | y^_<t, x) at T = 1 in nats (float32), over V or over the K+1 bins, 0 log 0 = 0."""
    if "lprobs" in teacher:
        lp = teacher["lprobs"].float()
    else:
        rest = teacher["topk_rest"].float().clamp(min=REST_FLOOR).unsqueeze(-1)
        lp = torch.cat([teacher["topk_lprobs"].float(), rest], -1).log_softmax(-1)  # fp16 rounding renormalized
    p = lp.exp()
    return -torch.where(p > 0, p * lp, p.new_zeros(())).sum(-1)


def _masked(w, mask):
    return (w * mask).float().detach()


def word(mask, alpha, **_):
    return _masked(torch.full(mask.shape, float(alpha), device=mask.device), mask)


def confidence(mask, teacher, target, **_):
    return _masked(1.0 - teacher_token_lprob(teacher, target).exp(), mask)


def entropy(mask, teacher, vocab_size, **_):
    return _masked((teacher_entropy(teacher) / math.log(vocab_size)).clamp(0, 1), mask)


def hkd(mask, teacher, target, student_lprob, **_):
    n = mask.sum(1).clamp(min=1)
    student = (student_lprob.float() * mask).sum(1) / n
    teacher_ll = (teacher_token_lprob(teacher, target) * mask).sum(1) / n
    return _masked((student > teacher_ll).float().unsqueeze(1).expand(mask.shape), mask)


def schedule(num_updates, start, end, ramp):
    """g(u) = start + (end - start) * min(1, u / ramp); end from update 0 when ramp = 0."""
    frac = 1.0 if ramp <= 0 else min(1.0, num_updates / ramp)
    return start + (end - start) * frac


def curriculum(mask, num_updates, start, end, ramp, **_):
    return word(mask, schedule(num_updates, start, end, ramp))


MIX_RULES = {
    "word": word,
    "confidence": confidence,
    "entropy": entropy,
    "hkd": hkd,
    "curriculum": curriculum,
}


def get_rule(name):
    """The weight function called ``name``; a clear error naming --kd-mix otherwise."""
    try:
        return MIX_RULES[name]
    except KeyError:
        raise ValueError("--kd-mix: unknown rule %r (choose from gate, %s)" % (name, ", ".join(MIX_RULES))) from None
