"""docs/PLATEAU.md and docs/plateau.png from docs/plateau_results.json (`examples/plateau.py --report`): (a) the
plateau table with the paired bootstrap of each method against the best other, (b) quality per compute, (c) the
on-policy stage, (d) decoding, with however many seeds exist (each row says its count); before them the
schedule pair (cosine vs inverse_sqrt for plain) and the batch-size measurement.
"""
import os
import statistics

from kdexp import plateau_answer as answer
from kdexp.mix import bootstrap_stats
from kdexp.pipeline import REPO, write_lines

METHODS = ("plain", "token", "sentence", "hybrid", "hybrid-gate")
STAGE_ARMS = ("stage-on-policy-1", "stage-on-policy-0.5", "stage-token")
FRACTIONS = answer.FRACTIONS
COMMAND = ".venv/bin/python examples/plateau.py --report"
by_method, ms = answer.by_method, answer.ms


def bootstrap_cell(rows, name, other):
    if other is None:
        return "-"
    d, lo, hi, p = bootstrap_stats([r["bleu_stats"] for r in rows[name]], [r["bleu_stats"] for r in rows[other]])
    return "%+.2f [%+.2f, %+.2f], p = %.3f vs %s" % (d, lo, hi, p, other)


def plateau_table(rows):
    """(a): test BLEU/chrF (beam 5, the checkpoint best on validation), mean ± std over seeds."""
    lines = ["| method | seeds | test BLEU | test chrF | best epoch | epochs run | paired-bootstrap BLEU diff "
             "vs the best other, over the seeds both have (mean [95% CI], p) |", "|---|---|---|---|---|---|---|"]
    means = {m: statistics.mean(r["test_bleu"] for r in rs) for m, rs in rows.items()}
    for m, rs in rows.items():  # the best other among those with the most seeds (a 1-seed mean is no reference)
        best = max((o for o in rows if o != m), key=lambda o: (len(rows[o]), means[o]), default=None)
        lines.append("| %s | %d | %s | %s | %s | %s | %s |" % (
            m, len(rs), ms(r["test_bleu"] for r in rs), ms(r["test_chrf"] for r in rs),
            ms((r["best_epoch"] for r in rs), 1 if len(rs) > 1 else 0),
            ms((len(r["curve"]) for r in rs), 1 if len(rs) > 1 else 0),
            "%s vs %s" % (answer.diff_text(answer.paired(rows, m, best)), best) if best else "-"))
    return lines


def compute_table(rows):
    """(b): each method's best validation BLEU within 1/4, 1/2 and 1x the compute plain needs to reach its best
    epoch (kdexp.plateau_answer.best_within)."""
    if "plain" not in rows:
        return ["(needs plain's runs)"]
    ref = answer.unit(rows)
    cells = answer.budget_cells(rows, ref)
    lines = ["Compute unit: plain's token-rows to its best epoch (mean over its seeds): %s. A cell: validation BLEU "
             "(greedy) of the best checkpoint saved within that compute; a run that ended sooner counts with its "
             "best. Every run anneals over its own budget, so a point mid-run is not what a run given that budget "
             "would reach: the equal-compute section compares annealed runs." % "{:,}".format(int(ref)),
             "", "| method | seeds | " + " | ".join("valid BLEU within %gx" % f for f in FRACTIONS) + " |",
             "|---|---|" + "---|" * len(FRACTIONS)]
    for m, rs in rows.items():
        lines.append("| %s | %d | %s |" % (m, len(rs), " | ".join(ms(cells[f][m]) if m in cells.get(f, {}) else "n/a"
                                                                 for f in FRACTIONS)))
    best = {f: max(c, key=lambda m: statistics.mean(c[m])) for f, c in cells.items()}
    lines += ["", "Best within " + "; ".join("%gx: %s" % (f, best[f]) for f in FRACTIONS if f in best) + "."]
    lines += ["", "Test BLEU (beam 5) at the fixed epochs that bracket each share of the compute unit (the "
              "method's epochs at that compute in brackets):", "",
              "| method | " + " | ".join("%gx" % f for f in FRACTIONS) + " |", "|---|" + "---|" * len(FRACTIONS)]
    for m, rs in rows.items():
        lines.append("| %s | %s |" % (m, " | ".join(bracket(rs, f * ref) for f in FRACTIONS)))
    fixed = sorted({e for rs in rows.values() for r in rs for e in r.get("fixed_epochs", {})}, key=int)
    lines += ["", "Test BLEU (beam 5) at fixed epochs:", "",
              "| method | " + " | ".join("epoch %s" % e for e in fixed) + " |", "|---|" + "---|" * len(fixed)]
    for m, rs in rows.items():
        lines.append("| %s | %s |" % (m, " | ".join(ms(r["fixed_epochs"][e] for r in rs)
                                                    if all(e in r["fixed_epochs"] for r in rs) else "n/a"
                                                    for e in fixed)))
    return lines


def equal_compute_lines(rows):
    """hybrid-half (the hybrid over half the budget) beside plain, token and the full hybrid: compute and wall
    time at the end of each run, its quality, and its paired bootstrap against token and plain."""
    lines = ["hybrid-half: hybrid_kd fixed:0.5 with its cosine budget and cap halved, so that its two passes add up "
             "to about the token-rows of plain's and token_kd's full budget and every run ends annealed (commands "
             "in the records).", "",
             "| method | seeds | epochs run | token-rows at the end | wall s at the end | best valid BLEU "
             "| test BLEU |",
             "|---|---|---|---|---|---|---|"]
    for m in ("plain", "token", "hybrid-half", "hybrid"):
        if m in rows:
            rs = rows[m]
            lines.append("| %s | %d | %s | %s | %s | %s | %s |" % (
                m, len(rs), ms((len(r["curve"]) for r in rs), 1), "{:,}".format(int(statistics.mean(
                    r["curve"][-1]["token_rows"] for r in rs))), ms((r["curve"][-1]["wall"] for r in rs), 0),
                ms(max(c["valid_bleu"] for c in r["curve"]) for r in rs), ms(r["test_bleu"] for r in rs)))
    lines.append("")
    for other in ("token", "plain"):
        if other in rows:
            lines.append("- hybrid-half vs %s (test BLEU, beam 5): %s" % (other, answer.diff_text(
                answer.paired(rows, "hybrid-half", other))))
    return lines


def bracket(rs, rows):
    """'e8 23.68 / e16 28.59 (11.3)': the fixed epochs every seed decoded just below and above the epoch at which
    these runs reach ``rows`` token-rows, with their mean test BLEU (one side when the other is missing)."""
    epoch = rows / rs[0]["curve"][0]["token_rows"]
    fixed = sorted(set.intersection(*(set(map(int, r.get("fixed_epochs", {}))) for r in rs)))
    sides = [max((e for e in fixed if e <= epoch), default=None), min((e for e in fixed if e >= epoch), default=None)]
    cells = ["e%d %s" % (e, ms(r["fixed_epochs"][str(e)] for r in rs)) for e in dict.fromkeys(sides) if e is not None]
    return "%s (%.1f)" % (" / ".join(cells) or "-", epoch)


def schedule_lines(plain, other):
    """The schedule pair: plain with the study's cosine schedule against the calibration's inverse_sqrt (each
    with its stopping rule), per seed both exist: compute and wall time to the best epoch, quality there."""
    seeds = sorted({r["seed"] for r in plain} & {r["seed"] for r in other})
    if not seeds:
        return ["(needs plain and schedule-inverse_sqrt of the same seed)"]
    lines = ["Plain students, the same flags but the schedule and the cap: the study's cosine (3e-3 to 0 over its "
             "budget, which is also its cap) against the calibration's inverse_sqrt (cap 60 epochs); both keep "
             "the best checkpoint by validation BLEU (greedy) and stop after 5 epochs without a new best. "
             "Commands in the records.", "",
             "| seed | schedule | stopped by | epochs run | best epoch | token-rows to best | wall s to best | "
             "best valid BLEU | test BLEU | test chrF |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed in seeds:
        pair = [next(r for r in rs if r["seed"] == seed) for rs in (plain, other)]
        for r in pair:
            best = next(c for c in r["curve"] if c["epoch"] == r["best_epoch"])
            lines.append("| %d | %s | %s | %d | %d | %s | %.0f | %.2f | %.2f | %.2f |" % (
                seed, r["schedule"], r["stopped"], len(r["curve"]), r["best_epoch"],
                "{:,}".format(best["token_rows"]), best["wall"], best["valid_bleu"], r["test_bleu"], r["test_chrf"]))
        rows = {"cosine": [pair[0]], "inverse_sqrt": [pair[1]]}
        ratio = [next(c for c in r["curve"] if c["epoch"] == r["best_epoch"])["token_rows"] for r in pair]
        lines += ["", "Seed %d: cosine reaches its best with %.2fx inverse_sqrt's token-rows to its best; test BLEU, "
                  "cosine minus inverse_sqrt (paired bootstrap): %s." % (
                      seed, ratio[0] / ratio[1], bootstrap_cell(rows, "cosine", "inverse_sqrt"))]
    return lines


def decoding_table(rows, note):
    names = ("beam5", "greedy", "sampling")
    lines = [note, "", "| run | seeds | " + " | ".join("BLEU %s" % d for d in names) + " |", "|---|---|---|---|---|"]
    for m, rs in rows.items():
        lines.append("| %s | %d | %s |" % (m, len(rs), " | ".join(ms(r["decoding"][d]["bleu"] for r in rs)
                                                                  for d in names)))
    return lines


def stage_lines(stages):
    lines = decoding_table(stages, "From each seed's token_kd best checkpoint, one epoch of updates per arm "
                                   "(commands in the records).")
    if "stage-token" in stages:
        lines += ["", "Each on-policy arm minus stage-token, test BLEU, paired bootstrap over the seeds both have "
                          "(mean [95% CI]; p: the share of resamples in which the arm does not score higher):", ""]
        for arm in STAGE_ARMS[:2]:
            if arm in stages:
                lines.append("- %s: %s" % (arm, "; ".join("%s %s" % (d, answer.diff_text(
                    answer.paired(stages, arm, "stage-token", d))) for d in answer.DECODINGS)))
    from kd_plugin.retired import ON_POLICY_COMMIT

    lines += ["", "on_policy_kd left the installed package after these runs (kd_plugin/retired.py; its code: "
              "`git show %s:kd_plugin/criterions/on_policy_kd.py`, its design and earlier measurements: "
              "[ON_POLICY.md](ON_POLICY.md)); these commands reproduce only with that commit." % ON_POLICY_COMMIT]
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in rows.items():
        epochs = min(len(r["curve"]) for r in rs)
        x = [statistics.mean(r["curve"][i]["token_rows"] for r in rs) for i in range(epochs)]
        ys = [[r["curve"][i]["valid_bleu"] for r in rs] for i in range(epochs)]
        ax.plot(x, [statistics.mean(y) for y in ys], label="%s (%d seed%s)" % (m, len(rs), "s" if len(rs) > 1 else ""))
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
    ax.set_xlabel("cumulative student token-rows (forward+backward)")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


MD, PNG = os.path.join(REPO, "docs", "PLATEAU.md"), os.path.join(REPO, "docs", "plateau.png")


def write(records, md=MD, png=PNG, answer_json=answer.JSON):
    """Write PLATEAU.md, the plot and kd-advise's answer (``answer_json``; None: not written) from ``records``;
    returns PLATEAU.md's text."""
    rows, stages = by_method(records, METHODS), by_method(records, STAGE_ARMS)
    teacher = next((r for r in records if r["method"] == "teacher"), None)
    lines = ["# The answer at the plateau (issue 28)", "",
             "Generated by `%s` from docs/plateau_results.json; do not edit." % COMMAND, ""]
    found = answer.answer(records)
    if found:
        lines += ["## The answer", "", "How it is read from the sections below: kdexp/plateau_answer.py; "
                  "kd-advise recommends from the same answer (kd_plugin/plateau_answer.json).", ""] + \
            answer.block(found) + [""]
        if answer_json:
            answer.write_json(found, answer_json)
    if teacher:
        lines += ["Teacher: test BLEU %.2f, chrF %.2f (beam 5), %d epochs, best epoch %d, sha256 %s." % (
            teacher["test_bleu"], teacher["test_chrf"], teacher["epochs"], teacher["best_epoch"],
            teacher["teacher_sha256"]), ""]
    pair = by_method(records, ("plain", "schedule-inverse_sqrt"))
    if len(pair) == 2:
        lines += ["## Schedule and stopping rule", ""] + schedule_lines(*pair.values()) + [""]
    batch = next((r for r in records if r["method"] == "batch"), None)
    if batch:
        lines += ["## Batch size", "", "Every run uses --max-tokens %d: %s (%d s of training each, one run at a "
                  "time; commands in the record)." % (batch["max_tokens"], batch["rule"], batch["seconds_each"]), "",
                  "| run | words/s | updates | validation loss at the end |", "|---|---|---|---|"]
        lines += ["| %s | %.1f | %d | %.3f |" % (k, v["wps"], v["updates"], v["valid_loss"])
                  for k, v in sorted(batch["runs"].items())] + [""]
    if rows:
        every = by_method(records, METHODS + ("hybrid-half",))
        lines += ["## (a) Plateau", ""] + plateau_table(rows) + ["", "## (b) Quality per compute", ""] + \
            compute_table(every) + ["", "![validation BLEU per compute](plateau.png)", ""]
        if "hybrid-half" in every:
            lines += ["## Equal compute", ""] + equal_compute_lines(every) + [""]
        lines += ["## (d) Decoding", ""] + decoding_table(every, "The checkpoint best on validation, test set.")
        plot(every, png)
    if stages:
        lines += ["", "## (c) The on-policy stage", ""] + stage_lines(stages)
    write_lines(md, lines)
    return "\n".join(lines)
