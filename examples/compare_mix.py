#!/usr/bin/env python3
"""Multi-seed comparison of KD configurations on the demo corpus with the demo's teacher (resumable).

    .venv/bin/python examples/compare_mix.py --configs token-full,token-cache8 --seeds 1,2,3 --epochs 3
    .venv/bin/python examples/compare_mix.py --configs ... --seeds ... --epochs 3 --report   # table only

It runs examples/demo.py's pipeline in the demo's work directory (corpus, BPE, data-bin, teacher and the
distilled corpus are built if missing and reused otherwise: the same cached steps), dumps a top-K teacher
cache when a configuration needs one, then trains one student per (configuration, seed) with the demo's
student size, optimizer and data for ``--epochs`` epochs, ``--jobs`` at a time, and scores each with stock
fairseq-generate + sacreBLEU. Each configuration (CONFIGS) spells out every flag of its criterion, so no run
depends on a criterion default. Each run appends one record to ``--results`` (default docs/mix_results.json:
configuration, its flags, the full fairseq-train command the run's step ran (``train_cmd``, from its
done-marker, paths relative to the repository), seed, epochs, updates, BLEU, chrF and their signatures, train
seconds, the validation loss/nll/ppl after each epoch). A stopped run resumes: finished steps are skipped.

The report gives, per configuration, mean and standard deviation over seeds and the paired bootstrap
(1,000 resamples of test sentences, seeds pooled: each resample draws the same sentence ids in every seed)
of each configuration against ``--baseline``: the MEAN over the resamples of the BLEU difference (not the
difference of the BLEU means in the same table), its 95% interval and p = the share of resamples where the
difference is <= 0. Records of retired configurations (RETIRED: modes that left kd-plugin) stay readable:
``--report --configs mix-word,...`` shows them, marked "(retired)", with the flags their records stored.
"""
import argparse
import copy
import concurrent.futures
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
import demo_speed  # noqa: E402
from demo_pipeline import REPO, StepFailed, read_lines  # noqa: E402
from demo_report import repo_relative  # noqa: E402

K = 8
KD = demo.KD_TASK
LS = ["--label-smoothing", "0.1"]
TEACHER = ["--teacher-path", "{teacher}"]
# Every criterion flag of each configuration is spelled out (values as of the recorded runs; no run depends on a
# criterion default): label_smoothed_cross_entropy's --label-smoothing, token_kd's nine flags, sentence_kd's
# --kd-gold-mix, and hybrid_kd = token_kd's flags + its gate's. Placeholders as in demo.STUDENTS plus {cache}
# (the top-K teacher cache of the gold prefixes, kd-dump-teacher). Spelled out here, not taken from
# demo.STUDENTS, so that the recorded runs keep their meaning when the demo changes.


def token_flags(topk):
    """token_kd's flags (also hybrid_kd's token-level half): forward KL at T = 1, alpha 1/2, every token."""
    return ["--kd-alpha", "0.5", "--kd-temperature", "1", "--kd-divergence", "forward_kl", "--kd-js-beta", "0.5",
            "--kd-skew-lambda", "0.1", "--kd-topk", str(topk), "--kd-select", "all", "--kd-select-rate", "0.5",
            "--kd-select-queue", "30000"]


def gate_flags(gate):
    """hybrid_kd's gate: ``fixed:<w>`` or ``sentence`` (the learned gate's settings are given either way)."""
    return ["--kd-gate", gate, "--kd-gate-tau", "1", "--kd-gate-weight", "1", "--kd-gate-momentum", "0.99",
            "--kd-gate-hidden", "64"]


SENTENCE = ["--criterion", "sentence_kd", "--kd-gold-mix", "0"]
CONFIGS = {
    "plain": ["--criterion", "label_smoothed_cross_entropy"] + LS,
    "token-full": KD + TEACHER + ["--criterion", "token_kd"] + token_flags(0) + LS,
    "token-cache8": KD + ["--teacher-cache", "{cache}", "--criterion", "token_kd"] + token_flags(K) + LS,
    "sentence": KD + ["--teacher-targets", "{distill}"] + SENTENCE + LS,
    # online teacher (full vocabulary): the learned per-sentence gate (hybrid_kd's default when its runs were
    # recorded) and the fixed even mix
    "hybrid-gate": KD + TEACHER + ["--teacher-targets", "{distill}", "--criterion", "hybrid_kd"] + token_flags(0)
    + gate_flags("sentence") + LS,
    "hybrid-even": KD + TEACHER + ["--teacher-targets", "{distill}", "--criterion", "hybrid_kd"] + token_flags(0)
    + gate_flags("fixed:0.5") + LS,
}
# hybrid_kd's two-prefix mix with token-level signals from the cache: fixed weights and the learned gate
for _name, _gate in (("even", "fixed:0.5"), ("w25", "fixed:0.25"), ("w75", "fixed:0.75"), ("gate", "sentence")):
    CONFIGS["hybrid-%s-cache8" % _name] = KD + ["--teacher-cache", "{cache}", "--teacher-targets", "{distill}",
                                                "--criterion", "hybrid_kd"] + token_flags(K) + gate_flags(_gate) + LS
# Deep encoder, shallow decoder (Kasai et al. 2021) at the demo student's parameter count: 2 + 1 layers with
# ffn 128 (117,184 non-embedding parameters) instead of 1 + 1 with ffn 256 (116,736); later flags win
DEEP_SHALLOW = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-ffn-embed-dim", "128",
                "--decoder-ffn-embed-dim", "128"]
CONFIGS["hybrid-even-cache8-ds"] = CONFIGS["hybrid-even-cache8"] + DEEP_SHALLOW
# Configurations of docs/mix_results.json whose modes left kd-plugin (kd_plugin/retired.py): --report still
# shows their records, with the flags each record stored; they cannot be trained again.
RETIRED = {"hybrid-global-cache8": "--kd-gate global", "hybrid-sample-cache8": "--kd-gate sample:0.5",
           **{"mix-" + r: "--kd-mix " + r for r in ("word", "confidence", "entropy", "hkd", "curriculum")}}
FIELD_RE = re.compile(r"\| (\w+) ([\d.]+)")


def run_name(config, seed, epochs):
    return "%s-s%d-e%d" % (config, seed, epochs)


def dump_cache(p):
    """Top-K teacher cache of train and valid: examples/demo.py's (the same steps and directories)."""
    return demo.dump_cache(p, K)


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


def train_and_score(p, config, seed, paths):
    """One student (cached steps) -> its record."""
    a, epochs = p.args, p.args.epochs
    view = copy.copy(p)
    view.args = copy.copy(a)
    view.args.seed, view.args.student_epochs = seed, epochs
    name = run_name(config, seed, epochs)
    flags = [str(arg).format(**paths) for arg in CONFIGS[config]]
    demo.train(view, name, "student", flags)
    scores = demo.evaluate(view, name)
    view.progress(name, "BLEU %.2f chrF %.2f" % (scores["bleu"], scores["chrf"]))
    return {"config": config, "flags": [repo_relative(f) for f in flags], "train_cmd": demo.recorded_train_cmd(p, name),
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
        demo_speed.export(view, name, demo.checkpoint(view, name))
    speed = demo_speed.speed_phase(view, names, reps, lambda n: demo.generate_cmd(view, n), step="speed-compare")
    refs = read_lines(p.path("corpus", "test.%s" % p.args.tgt_lang))
    for r, name in zip(records, names):
        r.update(demo_speed.sizes(view, name, demo.checkpoint(view, name)), **demo_speed.ct2_scores(view, name, refs),
                 params=demo.count_params(demo.checkpoint(view, name)),
                 fairseq_speed=statistics.median(speed[name]["fairseq"]), ct2_speed=statistics.median(speed[name]["ct2"]))
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
    import numpy as np
    from sacrebleu.metrics import BLEU

    bleu, n = BLEU(), len(refs)
    pooled = [np.sum([np.asarray(bleu._extract_corpus_statistics(h, [refs]), dtype=np.int64) for h in hyps], 0)
              for hyps in (hyps_a, hyps_b)]  # n x statistics, summed over seeds
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


def retired_label(config):
    return "%s (retired)" % config if config not in CONFIGS else config


def report(records, configs, seeds, epochs, baseline, refs):
    """Markdown: per configuration mean/std BLEU and chrF, last valid ppl, train s and the paired bootstrap
    against ``baseline`` (BOOTSTRAP_CAPTION says what that column is, under the table); then the stored flags of
    every retired configuration shown (a record whose configuration left CONFIGS is reported from the record
    itself). ``refs``: the test references, or None where they are not on this machine."""
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
            retired_label(c), len(rs), ms([r["bleu"] for r in rs]), ms([r["chrf"] for r in rs]),
            ms(ppl) if ppl else "-", statistics.mean(r["train_seconds"] for r in rs), cmp))
    lines += ["", BOOTSTRAP_CAPTION % (baseline, baseline)]
    retired = [c for c, rs in rows.items() if rs and c not in CONFIGS]
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="token-full,token-cache8", help="comma-separated, from %s" % list(CONFIGS))
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated student seeds")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs")
    parser.add_argument("--baseline", default=None, help="configuration the others are tested against "
                                                         "(default: the first of --configs)")
    parser.add_argument("--results", default=os.path.join(REPO, "docs", "mix_results.json"))
    parser.add_argument("--report", action="store_true", help="only print the table from --results")
    parser.add_argument("--plot", help="also write a PNG: BLEU per configuration and seed, validation curves")
    parser.add_argument("--speed", type=int, default=0, metavar="REPS",
                        help="also export every run to CTranslate2 int8 and time both decoding paths, interleaved "
                             "over REPS rounds, one thread (the demo's speed phase); 0: no timing")
    args, rest = parser.parse_known_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    known = set(CONFIGS) | (recorded_configs(args.results) if args.report else set())
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        retired = [c for c in unknown if c in RETIRED]
        parser.error("--configs: unknown %s (choose from %s)%s" % (unknown, ", ".join(CONFIGS), (
            "; %s retired: only --report shows their records" % ", ".join(retired)) if retired else ""))
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error("--seeds: comma-separated integers, got %r" % args.seeds)
    if args.epochs < 1 or not args.seeds or args.speed < 0:
        parser.error("--epochs must be >= 1, --seeds non-empty and --speed >= 0")
    args.baseline = args.baseline or args.configs[0]
    return args, demo.parse_args(rest + ["--students", "plain"])  # demo's flags: sizes, --work, --jobs, --quick


def main(argv=None):
    args, a = parse_args(argv)
    a.epochs = args.epochs
    p = demo.Pipeline(a)
    refs_path = p.path("corpus", "test.%s" % a.tgt_lang)
    if not args.report:
        try:
            demo.build_teacher(p)
            flags = " ".join(str(f) for c in args.configs for f in CONFIGS[c])
            if "{distill}" in flags:
                for split in ("train", "valid"):
                    demo.distill(p, split)
            paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": demo.checkpoint(p, "teacher"),
                     "distill": p.path("distill"), "cache": dump_cache(p) if "{cache}" in flags else None}
            view = p.with_threads(demo.student_threads(a))
            runs = [(c, s) for s in args.seeds for c in args.configs]
            with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
                futures = [pool.submit(train_and_score, view, c, s, paths) for c, s in runs]
                records = []
                for future in futures:  # keep every finished record even if a later run fails
                    try:
                        records.append(future.result())
                    except StepFailed as e:
                        print("compare_mix: %s" % e, file=sys.stderr)
            if args.speed and len(records) == len(runs):
                records = measure_speed(p, records, args.speed)
            merge_records(args.results, records)
            if len(records) < len(runs):
                sys.exit("compare_mix: %d of %d runs failed (see above); rerun to retry them"
                         % (len(runs) - len(records), len(runs)))
        except (StepFailed, demo.build_corpus.CorpusError) as e:
            sys.exit("compare_mix: %s" % e)
    with open(args.results) as f:
        records = json.load(f)
    refs = read_lines(refs_path) if os.path.isfile(refs_path) else None
    print(report(records, args.configs, args.seeds, args.epochs, args.baseline, refs))
    chosen = [r for r in records if r["config"] in args.configs and r["seed"] in args.seeds
              and r["epochs"] == args.epochs]
    if any("ct2_speed" in r for r in chosen):
        print(speed_report(chosen, args.configs))
    if args.plot:
        plot(records, args.configs, args.seeds, args.epochs, args.plot)


if __name__ == "__main__":
    main()
