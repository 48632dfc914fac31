r"""kd-advise's maths: the scenario signals, and the rule fitted on the study's cells (docs/STUDY.md).

Signals of a scenario (data split, teacher, student, decoding):
    capacity_ratio      = P_student / P_teacher   (parameters, kd_plugin.model_size.count_parameters)
    src_len             = mean over source sentences of |x| in subword pieces (EOS not counted)
    rare_rate           = share of source pieces whose dictionary index is outside the most frequent quarter of
                          the dictionary's real types: idx >= nspecial + floor((|V| - nspecial) / 4)
                          (fairseq dictionaries are sorted by training count)
    teacher_entropy     = mean over gold target positions t of H(p_t) = -sum_v p_t(v) log p_t(v)   (nats)
    teacher_confidence  = mean over gold target positions of max_v p_t(v)
    teacher_nll         = mean over gold target positions of -log p_t(y_t)
    decoding            = 0 beam search (beam >= 2), 1 greedy, 2 sampling   (harder = larger)
with p_t = p_teacher(. | y_<t, x) at temperature 1 (teacher forcing on the gold target, EOS included).

Rule: a constant (one method everywhere) or a stump on one signal s and threshold c:
    method(x) = below if s(x) <= c else above.
Fitting (:func:`fit_rule`) minimises the total BLEU lost over the cells,
    L(rule) = sum_cells [max_m BLEU(cell, m) - BLEU(cell, rule(cell))],
over every constant and every stump whose threshold is a midpoint between consecutive distinct values of a
signal (each side taking its best method by summed BLEU); ties keep the earlier candidate (constants first,
then signals in SIGNALS order), so the simplest rule wins. Seven cells fit a stump at best: the study reports
its leave-one-cell-out accuracy and BLEU lost (:func:`leave_one_out`), and kd-advise prints both.
"""
import math

import torch

SIGNALS = ("capacity_ratio", "decoding", "src_len", "rare_rate", "teacher_entropy", "teacher_confidence",
           "teacher_nll")
DECODINGS = ("beam", "greedy", "sampling")


# ---------------------------------------------------------------- signals


def decoding_level(beam, sampling):
    """0 beam search, 1 greedy, 2 sampling."""
    return 2 if sampling else 1 if beam == 1 else 0


def rare_threshold(dict_size, nspecial):
    """First dictionary index counted as rare: nspecial + floor((dict_size - nspecial) / 4)."""
    return nspecial + (dict_size - nspecial) // 4


def source_stats(sentences, eos, threshold):
    """(src_len, rare_rate) of token-id sentences (1-D tensors, a trailing ``eos`` not counted)."""
    pieces = n = rare = 0
    for s in sentences:
        s = s[:-1] if len(s) and int(s[-1]) == eos else s
        n += 1
        pieces += len(s)
        rare += int((s >= threshold).sum())
    return pieces / max(n, 1), rare / max(pieces, 1)


def teacher_sums(lprobs, target, pad):
    """Sums over the non-pad positions of a batch: {"positions", "entropy", "confidence", "nll"}.

    lprobs: B x T x V teacher log-probs (float32), target: B x T gold ids."""
    mask = target.ne(pad)
    lp = lprobs[mask].double()                     # N x V
    p = lp.exp()
    gold = lp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
    return {"positions": int(mask.sum()),
            "entropy": float(-(p * lp.clamp(min=-1e30)).sum(-1).sum()),  # 0 * -inf -> 0
            "confidence": float(p.max(-1).values.sum()),
            "nll": float(-gold.sum())}


def teacher_means(sums):
    """Means of accumulated :func:`teacher_sums` (a list of per-batch dicts)."""
    n = sum(s["positions"] for s in sums)
    return {"teacher_" + k: sum(s[k] for s in sums) / max(n, 1) for k in ("entropy", "confidence", "nll")}


# ---------------------------------------------------------------- the rule


def apply_rule(rule, signals):
    """The method a rule picks for a scenario's signals."""
    if rule.get("signal") is None:
        return rule["method"]
    return rule["below"] if signals[rule["signal"]] <= rule["threshold"] else rule["above"]


def bleu_lost(rule, cells):
    """sum_cells max_m BLEU(cell, m) - BLEU(cell, rule(cell))."""
    return sum(max(c["bleu"].values()) - c["bleu"][apply_rule(rule, c["signals"])] for c in cells)


def _best(cells, methods):
    """The method with the largest summed BLEU over ``cells`` (first of ``methods`` on ties)."""
    return max(methods, key=lambda m: (sum(c["bleu"][m] for c in cells), -methods.index(m)))


def candidates(cells, methods, signals=SIGNALS):
    """Every constant rule, then every stump (thresholds at midpoints of consecutive distinct values)."""
    out = [{"signal": None, "method": m} for m in methods]
    for s in signals:
        values = sorted({c["signals"][s] for c in cells})
        for lo, hi in zip(values, values[1:]):
            c_ = (lo + hi) / 2
            below = [c for c in cells if c["signals"][s] <= c_]
            above = [c for c in cells if c["signals"][s] > c_]
            out.append({"signal": s, "threshold": c_, "below": _best(below, methods),
                        "above": _best(above, methods)})
    return out


def fit_rule(cells, methods, signals=SIGNALS):
    """The candidate with the least BLEU lost over ``cells`` (the first on ties: the simplest)."""
    best, best_loss = None, math.inf
    for rule in candidates(cells, list(methods), signals):
        loss = bleu_lost(rule, cells)
        if loss < best_loss - 1e-9:
            best, best_loss = rule, loss
    return best


def leave_one_out(cells, methods, signals=SIGNALS):
    """Per held-out cell: the rule fitted on the others, its pick, the best method and the BLEU lost."""
    out = []
    for i, held in enumerate(cells):
        rule = fit_rule(cells[:i] + cells[i + 1:], methods, signals)
        pick = apply_rule(rule, held["signals"])
        best = max(methods, key=lambda m: held["bleu"][m])
        out.append({"cell": held["cell"], "rule": rule, "pick": pick, "best": best,
                    "correct": pick == best, "bleu_lost": held["bleu"][best] - held["bleu"][pick]})
    return out


def nearest_cell(cells, signals, names=SIGNALS):
    """The cell closest to ``signals`` in the signals standardised over the cells (each / its std over cells;
    a signal constant over the cells is left out)."""
    scale = {}
    for s in names:
        v = torch.tensor([c["signals"][s] for c in cells], dtype=torch.float64)
        if len(v) > 1 and float(v.std()) > 0:
            scale[s] = float(v.std())
    return min(cells, key=lambda c: sum(((c["signals"][s] - signals[s]) / sd) ** 2 for s, sd in scale.items()))
