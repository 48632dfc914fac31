"""The plateau study's answer (issue 28), from docs/plateau_results.json: the block of docs/PLATEAU.md that
README's "Which KD?" quotes, and kd_plugin/plateau_answer.json, which kd-advise recommends from.

    best final student  = argmax_m mean_seeds test BLEU(m)          m in plain, token, sentence, hybrid
    tight budget at f   = argmax_m mean_seeds best_within(m, f * U)  f in 1/4, 1/2, 1
    equal compute       = hybrid-half against token (both annealed over their own budgets, ~equal token-rows)
    learned gate        = hybrid-gate against hybrid; with SEEDS seeds, above / below / not separated by the
                          paired bootstrap's 95% interval (the recommendation stays among the four methods)

U: plain's token-rows to its best epoch (mean over its seeds); best_within: validation BLEU of the best
checkpoint saved within that many token-rows. Differences of test BLEU: paired bootstrap over the seeds both
methods have, for each decoding; validation BLEU (the budget picks) keeps no per-sentence statistics, so its
runner-up is flagged when the two means are within the seeds' spread.
Provisional until every method of the four has SEEDS seeds.
"""
import json
import os
import statistics

from kdexp.mix import bootstrap_stats
from kdexp.pipeline import REPO

MAIN = ("plain", "token", "sentence", "hybrid")
FRACTIONS = (0.25, 0.5, 1.0)
DECODINGS = ("beam5", "greedy", "sampling")
SEEDS = 3
NAMES = {"plain": "plain training (label_smoothed_cross_entropy)", "token": "token_kd (top-8 cache)",
         "sentence": "sentence_kd", "hybrid": "hybrid_kd fixed:0.5", "hybrid-half": "hybrid_kd fixed:0.5 over half "
         "the epochs", "hybrid-gate": "hybrid_kd with the learned gate"}
# what a complete gate comparison means for the recommendation (the fixed weight has no gate network to train)
GATE_VERDICT = {"not separated": "; not separated: the fixed 1/2 stays the recommendation (no gate network, the "
                                 "same two passes)",
                "below": "; below it: the fixed 1/2 stays the recommendation",
                "above": "; above it at the same two passes (the best-final-student line ranks the four main "
                         "methods only)"}
JSON = os.path.join(REPO, "kd_plugin", "plateau_answer.json")
BLOCK = "plateau-answer"


def by_method(records, names):
    out = {m: sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"]) for m in names}
    return {m: rs for m, rs in out.items() if rs}


def mean_std(values):
    """{"mean", "std" (None for one value), "n"}."""
    values = list(values)
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def mean_text(m, digits=2):
    """A mean_std as 'mean ± std' (just the mean for one value) with ``digits`` decimals."""
    return "%.*f" % (digits, m["mean"]) if m["std"] is None else "%.*f ± %.*f" % (digits, m["mean"], digits, m["std"])


def ms(values, digits=2):
    """'mean ± std' of ``values`` (std over >= 2 values) with ``digits`` decimals."""
    return mean_text(mean_std(values), digits)


def sentence_stats(r, decoding="beam5"):
    """A record's per-sentence BLEU statistics of the test set under ``decoding`` (None when not kept)."""
    return r["bleu_stats"] if decoding == "beam5" else r["decoding"][decoding].get("bleu_stats")


def paired(rows, a, b, decoding="beam5"):
    """Paired bootstrap of a's test sentences against b's under ``decoding``, over the seeds both have: {"diff",
    "lo", "hi", "p", "seeds"}; None without a common seed or when a run kept no statistics for it."""
    seeds = sorted({r["seed"] for r in rows[a]} & {r["seed"] for r in rows[b]})
    stats = [[sentence_stats(r, decoding) for r in rows[m] if r["seed"] in seeds] for m in (a, b)]
    if not seeds or any(s is None for runs in stats for s in runs):
        return None
    return dict(zip(("diff", "lo", "hi", "p"), bootstrap_stats(*stats)), seeds=seeds)


def diff_text(d):
    if d is None:
        return "n/a (no common seed, or no per-sentence statistics kept)"
    return "%+.2f [%+.2f, %+.2f], p = %.3f (seed%s %s)" % (
        d["diff"], d["lo"], d["hi"], d["p"], "s" if len(d["seeds"]) > 1 else "", ", ".join(map(str, d["seeds"])))


def verdict(d):
    """"above" / "below" when a paired bootstrap's 95% interval excludes 0, else "not separated" (None: no
    comparison)."""
    if d is None:
        return None
    return "above" if d["lo"] > 0 else "below" if d["hi"] < 0 else "not separated"


def to_best(r, key):
    """``key`` (token_rows or wall) of a run at its best epoch."""
    return next(c[key] for c in r["curve"] if c["epoch"] == r["best_epoch"])


def best_within(curve, rows):
    """Validation BLEU of the best checkpoint saved within ``rows`` cumulative token-rows (a run that ended
    sooner: its best); None before its first epoch."""
    seen = [c["valid_bleu"] for c in curve if c["token_rows"] <= rows]
    return max(seen) if seen else None


def unit(rows):
    """U: plain's token-rows to its best epoch, mean over its seeds."""
    return statistics.mean(to_best(r, "token_rows") for r in rows["plain"]) if "plain" in rows else None


def budget_cells(rows, u):
    """{fraction: {method: [best_within per seed]}} for the methods whose every seed has a value."""
    out = {}
    for f in FRACTIONS:
        for m, rs in rows.items():
            values = [best_within(r["curve"], f * u) for r in rs]
            if all(v is not None for v in values):
                out.setdefault(f, {})[m] = values
    return out


def within_spread(a, b):
    """True when two methods' means differ by less than the larger of their seed standard deviations (None when
    either has one seed or there is no second method)."""
    if b is None or a["std"] is None or b["std"] is None:
        return None
    return abs(a["mean"] - b["mean"]) < max(a["std"], b["std"])


def ranked(values):
    """{method: [value per seed]} -> the best by mean and the next: {"method", "value", "runner_up",
    "runner_up_value", "within_spread"} (values as mean_std)."""
    order = sorted(values, key=lambda m: statistics.mean(values[m]), reverse=True)
    best = mean_std(values[order[0]])
    runner = mean_std(values[order[1]]) if len(order) > 1 else None
    return {"method": order[0], "value": best, "runner_up": order[1] if runner else None, "runner_up_value": runner,
            "within_spread": within_spread(best, runner)}


def by_decoding(rows, decoding):
    """The ranking of test BLEU under ``decoding``, with the paired bootstrap of the best against the next."""
    top = ranked({m: [r["decoding"][decoding]["bleu"] for r in rs] for m, rs in rows.items()})
    top["vs_runner_up"] = paired(rows, top["method"], top["runner_up"], decoding) if top["runner_up"] else None
    return top


def answer(records):
    """The answer as a dict (kd_plugin/plateau_answer.json); None without runs of the four methods."""
    rows = by_method(records, MAIN)
    if len(rows) < 2 or "plain" not in rows:
        return None
    top = ranked({m: [r["test_bleu"] for r in rs] for m, rs in rows.items()})
    final, runner = top["method"], top["runner_up"]
    u = unit(rows)
    plain_wall = statistics.mean(to_best(r, "wall") for r in rows["plain"])
    cost = {m: {"compute_vs_plain": statistics.mean(to_best(r, "token_rows") for r in rs) / u,
                "wall_vs_plain": statistics.mean(to_best(r, "wall") for r in rs) / plain_wall}
            for m, rs in rows.items()}
    out = {"version": 1, "source": "docs/PLATEAU.md", "seeds": {m: len(rs) for m, rs in rows.items()},
           "complete": all(len(rows.get(m, ())) >= SEEDS for m in MAIN), "unit_token_rows": u, "cost": cost,
           "final": dict({"method": final, "test_bleu": top["value"], "runner_up": runner,
                          "runner_up_bleu": top["runner_up_value"], "vs_runner_up": paired(rows, final, runner),
                          "plain_bleu": mean_std(r["test_bleu"] for r in rows["plain"]),
                          "vs_plain": paired(rows, final, "plain") if final != "plain" else None},
                         **cost[final]),
           "budget": [dict(ranked(cells), fraction=f) for f, cells in sorted(budget_cells(rows, u).items())],
           "by_decoding": {d: by_decoding(rows, d) for d in DECODINGS}}
    half = by_method(records, ("hybrid-half",))
    if half and "token" in rows:
        both = dict(rows, **half)
        out["equal_compute"] = {
            "method": "hybrid-half", "test_bleu": mean_std(r["test_bleu"] for r in half["hybrid-half"]),
            "vs_token": paired(both, "hybrid-half", "token"),
            "compute_vs_token": statistics.mean(r["curve"][-1]["token_rows"] for r in half["hybrid-half"])
            / statistics.mean(r["curve"][-1]["token_rows"] for r in rows["token"])}
    gate = by_method(records, ("hybrid-gate",))
    if gate and "hybrid" in rows:
        vs_fixed = paired(dict(rows, **gate), "hybrid-gate", "hybrid")
        out["gate"] = {"method": "hybrid-gate", "test_bleu": mean_std(r["test_bleu"] for r in gate["hybrid-gate"]),
                       "vs_fixed": vs_fixed, "complete": len(gate["hybrid-gate"]) >= SEEDS,
                       "verdict": verdict(vs_fixed)}
    scenario = next((r for r in records if r["method"] == "scenario"), None)
    if scenario:
        out["scenario"] = {k: scenario[k] for k in ("signals", "student_params", "teacher_params")}
    return out


def block(a):
    """The lines of the generated block README quotes (between its BEGIN and END markers), from answer ``a``."""
    f = a["final"]

    def seeds(m):
        return "%d seed%s" % (m["n"], "s" if m["n"] > 1 else "")

    lines = ["<!-- %s: BEGIN (generated, do not edit) -->" % BLOCK,
             "- **Best final student: %s.** Test BLEU %s (beam 5, %s) against %s %s (%d); paired bootstrap: "
             "%s. Its cost: %.2fx plain's student token-rows and %.2fx its wall time to the best epoch." % (
                 NAMES[f["method"]], mean_text(f["test_bleu"]), seeds(f["test_bleu"]), NAMES[f["runner_up"]],
                 mean_text(f["runner_up_bleu"]), f["runner_up_bleu"]["n"], diff_text(f["vs_runner_up"]),
                 f["compute_vs_plain"], f["wall_vs_plain"])]
    if f.get("vs_plain"):
        lines.append("- **Against plain training** (label-smoothed cross-entropy on the gold targets, %s): %s, "
                     "paired bootstrap %s." % (mean_text(f["plain_bleu"]), NAMES[f["method"]],
                                               diff_text(f["vs_plain"])))
    if a["budget"]:
        def pick(b):
            text = "%gx: %s (valid BLEU %s" % (b["fraction"], NAMES[b["method"]], mean_text(b["value"]))
            if b["runner_up"]:
                text += "; next %s %s%s" % (NAMES[b["runner_up"]], mean_text(b["runner_up_value"]),
                                            ", within the seeds' spread" if b["within_spread"] else "")
            return text + ")"

        lines.append("- **Tight budget:** the best checkpoint saved within a share of plain's student compute to "
                     "its plateau (%s token-rows) comes from %s." % (
                         "{:,}".format(int(a["unit_token_rows"])), "; ".join(pick(b) for b in a["budget"])))
    def against(b):
        if b.get("vs_runner_up"):
            return "; paired bootstrap %s" % diff_text(b["vs_runner_up"])
        return ", within the seeds' spread" if b["within_spread"] else ""

    lines.append("- **By decoding** (test BLEU of the best checkpoints; the paper's decoding axis): %s." % "; ".join(
        "%s: %s %s (next %s %s%s)" % (d, NAMES[b["method"]], mean_text(b["value"]), NAMES[b["runner_up"]],
                                      mean_text(b["runner_up_value"]), against(b))
        for d, b in a["by_decoding"].items()))
    e = a.get("equal_compute")
    if e:
        lines.append("- **Equal compute, both annealed:** %s (%.2fx token_kd's token-rows) scores %s test BLEU "
                     "(%s); against token_kd: %s." % (
                         NAMES["hybrid-half"], e["compute_vs_token"], mean_text(e["test_bleu"]), seeds(e["test_bleu"]),
                         diff_text(e["vs_token"])))
    else:
        lines.append("- **Equal compute, both annealed:** hybrid-half (the hybrid over half the epochs) not run yet.")
    g = a.get("gate")
    if g:
        lines.append("- **The learned gate** (the paper's gated hybrid, `--kd-gate sentence`): %s test BLEU (%s); "
                     "against the fixed 1/2: %s%s." % (mean_text(g["test_bleu"]), seeds(g["test_bleu"]),
                                                       diff_text(g["vs_fixed"]), GATE_VERDICT.get(
                                                           g.get("verdict") if g.get("complete") else None, "")))
    else:
        lines.append("- **The learned gate** (the paper's gated hybrid, `--kd-gate sentence`): not run yet.")
    seeds = ", ".join("%s %d" % (m, a["seeds"].get(m, 0)) for m in MAIN)
    lines.append("- Status: %s (seeds: %s)." % ("final" if a["complete"] else
                                                 "**provisional** until every method has %d seeds" % SEEDS, seeds))
    return lines + ["<!-- %s: END -->" % BLOCK]


def write_json(a, path=JSON):
    with open(path + ".tmp", "w") as f:
        json.dump(a, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
