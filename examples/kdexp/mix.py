"""Multi-seed comparison of configurations (examples/compare_mix.py; also distill_engines' students): one
student per (configuration, seed) trained and scored with the demo's steps -> one record; records merged into a
results file; the report (mean ± std over seeds, the paired bootstrap against a baseline) and its plot; the
speed columns (the demo's speed phase over the runs).
"""
import copy
import json
import os
import re
import statistics

from kdexp import recipes, speed
from kdexp.configs import MIX, RETIRED
from kdexp.pipeline import REPO, read_lines, repo_relative

FIELD_RE = re.compile(r"\| (\w+) ([\d.]+)")


def run_name(config, seed, epochs):
    return "%s-s%d-e%d" % (config, seed, epochs)


def valid_curve(p, name):
    """[{"updates", "loss", "nll_loss", "ppl"}] after each epoch, from the run's fairseq-train log."""
    curve = []
    with open(p.path("logs", "train-%s.log" % name), errors="replace") as f:
        for line in f:
            if "valid on 'valid' subset" in line:
                fields = dict(FIELD_RE.findall(line))
                curve.append({"updates": int(fields["num_updates"]),
                              **{k: float(fields[k]) for k in ("loss", "nll_loss", "ppl")}})
    return curve


def train_and_score(p, config, seed, paths, args=None):
    """One student (cached steps) -> its record. ``args``: the configuration's fairseq-train arguments (default
    MIX[config]'s), placeholders filled from ``paths``."""
    a, epochs = p.args, p.args.epochs
    view = copy.copy(p)
    view.args = copy.copy(a)
    view.args.seed, view.args.student_epochs = seed, epochs
    name = run_name(config, seed, epochs)
    flags = [str(arg).format(**paths) for arg in (args or MIX[config].flags())]
    recipes.train(view, name, "student", flags)
    scores = recipes.evaluate(view, name)
    view.progress(name, "BLEU %.2f chrF %.2f" % (scores["bleu"], scores["chrf"]))
    return {"config": config, "flags": [repo_relative(f) for f in flags],
            "train_cmd": recipes.recorded_train_cmd(p, name),
            "teacher_sha256": recipes.teacher_sha256(p),
            "seed": seed, "epochs": epochs, "updates": scores["updates"], "bleu": scores["bleu"],
            "chrf": scores["chrf"], "bleu_signature": scores["bleu_signature"],
            "chrf_signature": scores["chrf_signature"], "params": scores["params"],
            "train_seconds": round(p.cached("train-" + name)["seconds"], 1), "valid": valid_curve(p, name),
            "hyps": os.path.relpath(p.path("eval", "%s.hyp" % name), REPO)}


def merge_records(path, records):
    """Replace the records of the same (config, seed, epochs) in ``path`` (a JSON list), keep the others."""
    old = []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    keys = {(r["config"], r["seed"], r["epochs"]): r for r in records}
    for r in old:  # a run scored again without --speed keeps its timings if it decodes the same (same model)
        new = keys.get((r["config"], r["seed"], r["epochs"]))
        if new is not None and "ct2_speed" not in new and (r["bleu"], r["updates"]) == (new["bleu"], new["updates"]):
            new.update({k: r[k] for k in SPEED_FIELDS if k in r})
    merged = [r for r in old if (r["config"], r["seed"], r["epochs"]) not in keys] + records
    merged.sort(key=lambda r: (r["config"], r["epochs"], r["seed"]))
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(path + ".tmp", path)
    return merged


SPEED_FIELDS = ("ckpt_mb", "ct2_mb", "ct2_agreement", "ct2_bleu", "ct2_chrf", "fairseq_speed", "ct2_speed")


def measure_speed(p, records, reps):
    """Export every run of ``records`` (kd-export int8) and time its test decoding with stock fairseq-generate
    and with the export, one process and one thread at a time, interleaved over ``reps`` rounds (the demo's
    speed phase, step "speed-compare"); adds params, sizes, median sentences/s and the export's BLEU/chrF."""
    names = [run_name(r["config"], r["seed"], r["epochs"]) for r in records]
    view = p.with_threads(1)
    for name in names:
        speed.export(view, name, recipes.checkpoint(view, name))
    timed = speed.speed_phase(view, names, reps, lambda n: recipes.generate_cmd(view, n), step="speed-compare")
    refs = read_lines(p.path("corpus", "test.%s" % p.args.tgt_lang))
    for r, name in zip(records, names):
        ckpt = recipes.checkpoint(view, name)
        r.update(speed.sizes(view, name, ckpt), **speed.ct2_scores(view, name, refs),
                 params=recipes.count_params(ckpt), fairseq_speed=statistics.median(timed[name]["fairseq"]),
                 ct2_speed=statistics.median(timed[name]["ct2"]))
    return records


def speed_report(records, configs):
    """Markdown: per configuration params, median over seeds of both paths' sentences/s, the export's BLEU."""
    lines = ["| config | params | fairseq-generate sent/s | CTranslate2 int8 sent/s | BLEU fairseq / int8 |",
             "|---|---:|---:|---:|---|"]
    for c in configs:
        rs = [r for r in records if r["config"] == c and "ct2_speed" in r]
        if rs:
            lines.append("| %s | %s | %.1f | %.1f | %.2f / %.2f |" % (
                c, "{:,}".format(rs[0]["params"]), statistics.median(r["fairseq_speed"] for r in rs),
                statistics.median(r["ct2_speed"] for r in rs), statistics.mean(r["bleu"] for r in rs),
                statistics.mean(r["ct2_bleu"] for r in rs)))
    return "\n".join(lines)


def paired_bootstrap(hyps_a, hyps_b, refs, resamples=1000, seed=12345):
    """BLEU(a) - BLEU(b) over ``resamples`` draws of test-sentence ids, seeds pooled (hyps_x: one list of
    hypotheses per seed, refs: the references): each draw sums the sentences' BLEU statistics over the drawn
    ids in every seed. Returns (mean difference, 2.5% and 97.5% quantiles, p = share of differences <= 0)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    return bootstrap_stats(*([bleu._extract_corpus_statistics(h, [refs]) for h in hyps] for hyps in (hyps_a, hyps_b)),
                           resamples=resamples, seed=seed)


def bootstrap_stats(stats_a, stats_b, resamples=1000, seed=12345):
    """paired_bootstrap from the sentences' BLEU statistics (stats_x: one n x 10 list per seed, sacreBLEU's
    per-sentence statistics), so records that keep them need no hypotheses."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    pooled = [np.sum([np.asarray(s, dtype=np.int64) for s in stats], 0) for stats in (stats_a, stats_b)]
    n = len(pooled[0])  # sentences; statistics summed over seeds
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        a, b = (bleu._compute_score_from_stats((counts @ s).tolist()).score for s in pooled)
        diffs.append(a - b)
    diffs = np.sort(diffs)
    return (float(diffs.mean()), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)),
            float((diffs <= 0).mean()))


BOOTSTRAP_CAPTION = (
    "BLEU and chrF: mean ± sample std over the seeds. Paired-bootstrap diff vs %s: BLEU(config) - BLEU(%s) over "
    "1,000 resamples of the test sentences, each resample drawing the same sentence ids in every seed and scoring "
    "the seeds' hypotheses pooled into one corpus; shown are the mean over the resamples, their 2.5%%-97.5%% "
    "quantiles and p = the share of resamples <= 0. That mean is not the difference of the BLEU means in the "
    "table (pooled-corpus BLEU is not the mean of per-seed BLEU); n/a: hypotheses or references not on this "
    "machine.")


def load_hyps(rs, refs):
    """The hypotheses of records ``rs`` (sorted by seed), or None when the references or a file are missing."""
    paths = [os.path.join(REPO, r["hyps"]) for r in sorted(rs, key=lambda r: r["seed"])]
    if refs is None or not all(os.path.isfile(f) for f in paths):
        return None
    return [read_lines(f) for f in paths]


def report(records, configs, seeds, epochs, baseline, refs, known=MIX):
    """Markdown: per configuration mean/std BLEU and chrF, last valid ppl, train s and the paired bootstrap
    against ``baseline`` (BOOTSTRAP_CAPTION says what that column is, under the table); then the stored flags of
    every retired configuration shown (a record whose configuration left MIX is reported from the record
    itself). ``refs``: the test references, or None where they are not on this machine; ``known``: the
    configurations that can be trained (the others are retired)."""
    rows = {c: [r for r in records if r["config"] == c and r["epochs"] == epochs and r["seed"] in seeds]
            for c in configs}
    hyps = {c: load_hyps(rs, refs) for c, rs in rows.items()}
    lines = ["| config | seeds | BLEU mean ± std | chrF mean ± std | valid ppl (last epoch) | train s | "
             "BLEU vs %s: paired-bootstrap diff (mean [95%% CI], p) |" % baseline,
             "|---|---:|---:|---:|---:|---:|---|"]

    def ms(values):
        return "%.2f ± %.2f" % (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    for c, rs in rows.items():
        if not rs:
            continue
        cmp = ""
        if c != baseline and rows.get(baseline) and len(rows[baseline]) == len(rs):
            if hyps[c] is None or hyps[baseline] is None:
                cmp = "n/a"
            else:
                d, lo, hi, p = paired_bootstrap(hyps[c], hyps[baseline], refs)
                cmp = "%+.2f [%+.2f, %+.2f], p = %.3f" % (d, lo, hi, p)
        ppl = [r["valid"][-1]["ppl"] for r in rs if r["valid"]]
        lines.append("| %s | %d | %s | %s | %s | %.0f | %s |" % (
            c if c in known else "%s (retired)" % c, len(rs), ms([r["bleu"] for r in rs]), ms([r["chrf"] for r in rs]),
            ms(ppl) if ppl else "-", statistics.mean(r["train_seconds"] for r in rs), cmp))
    lines += ["", BOOTSTRAP_CAPTION % (baseline, baseline)]
    retired = [c for c, rs in rows.items() if rs and c not in known]
    if retired:
        lines += ["", "Retired configurations (their modes left kd-plugin, kd_plugin/retired.py; they cannot be "
                      "trained again), with the flags their records stored:"]
        for c in retired:
            for flags in sorted({" ".join(r["flags"]) for r in rows[c]}):
                lines.append("- %s%s: `%s`" % (c, " (%s)" % RETIRED[c] if c in RETIRED else "", flags))
    return "\n".join(lines)


def plot(records, configs, seeds, epochs, path):
    """PNG: BLEU per configuration (one point per seed, the mean as a bar) and validation ppl per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {c: [r for r in records if r["config"] == c and r["epochs"] == epochs and r["seed"] in seeds]
            for c in configs}
    runs = {c: rs for c, rs in runs.items() if rs}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (c, rs) in enumerate(runs.items()):
        bleu = [r["bleu"] for r in rs]
        left.bar(i, sum(bleu) / len(bleu), color="#cfd8e3")
        left.plot([i] * len(bleu), bleu, "o", color="#1f4e79")
        for r in rs:
            right.plot([v["updates"] for v in r["valid"]], [v["ppl"] for v in r["valid"]], "o-", color="C%d" % i,
                       label=c if r is rs[0] else None, alpha=0.8)
    left.set_xticks(range(len(runs)), list(runs), rotation=30, ha="right")
    left.set_ylabel("test BLEU (sacreBLEU)")
    left.set_ylim(min(r["bleu"] for rs in runs.values() for r in rs) - 1, None)
    left.set_title("BLEU, %d epochs (points: seeds)" % epochs)
    right.set_xlabel("updates")
    right.set_ylabel("validation ppl (its own criterion's nll_loss)")
    right.set_yscale("log")
    right.set_title("validation after each epoch")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def recorded_configs(path):
    """The configurations that have records in ``path`` (none if it does not exist)."""
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {r["config"] for r in json.load(f)}
