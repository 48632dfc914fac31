"""The study's records (examples/study.py): merge into the results file, markdown tables per axis, matplotlib
plots (BLEU and BLEU relative to plain vs each axis, one line per method, seed spread as error bars), and the
grid's cost estimated from docs/mix_results.json.

Per cell and method: mean and sample standard deviation over seeds of BLEU and chrF; "vs plain" is the mean of
the method's BLEU minus the mean of plain's BLEU in the same cell (seeds paired by construction: same seeds).
The significance table is a paired bootstrap instead (SIGNIFICANCE_CAPTION): the mean over resamples of the
pooled-corpus BLEU difference, which need not equal the difference of the means in the axis tables.
"""
import json
import os
import statistics

from kdexp.pipeline import REPO, read_lines

ORDER = ("hybrid", "token", "sentence", "plain")  # slowest first (docs/MIX.md timings)
# the compare_mix configuration whose 3-epoch train time stands for each method (plain: none measured; it
# trains like sentence_kd, one pass with a label-smoothed NLL)
MIX_PROXY = {"plain": "sentence", "token": "token-cache8", "sentence": "sentence", "hybrid": "hybrid-even-cache8"}
DECODE_SECONDS = {"student": 12.0, "teacher": 26.0}  # one decoding of the demo's 1,000 test sentences (eval steps)
AXES = ("complexity", "size", "decoding")


def key(r):
    return r["cell"], r["method"], r["seed"], r["updates"]


def merge_records(path, records):
    """mix.merge_records with the study's key (cell, method, seed, updates): replace, keep the others."""
    old = []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    keys = {key(r) for r in records}
    merged = sorted([r for r in old if key(r) not in keys] + records, key=key)
    with open(path + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(path + ".tmp", path)
    return merged


def select(records, args, cells):
    """{(cell, method): [records sorted by seed]} of the grid's cells, methods, seeds and budget."""
    names = {cell for cell, _ in cells}
    out = {}
    for r in records:
        if r["cell"] in names and r["method"] in args.methods and r["seed"] in args.seeds and \
                (not args.updates or r["updates"] == args.updates):
            out.setdefault((r["cell"], r["method"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def axis_cells(cells, axis, order):
    """[(level, cell)] along ``axis``, levels in ``order`` (the centre in its place)."""
    centre = cells[0][1]
    on_axis = {coords[axis]: cell for cell, coords in cells
               if all(coords[other] == centre[other] for other in AXES if other != axis)}
    return [(lv, on_axis[lv]) for lv in order]


def level_measure(rs, axis):
    """The level's measure column (from the first record's measures)."""
    m = rs[0]["measures"][axis]
    if axis == "complexity":
        t = m["test"]
        return "%.1f / %.3f / %s" % (t["mean_len"], t["rare_rate"], fmt(m.get("teacher_bleu")))
    if axis == "size":
        return "{:,} ({:.2f})".format(m["params"], m["ratio"])
    return "`%s` / %s" % (" ".join(m["flags"]), fmt(m.get("teacher_bleu")))


def fmt(x):
    return "-" if x is None else "%.2f" % x


MEASURE_HEAD = {"complexity": "test: mean src len / rare rate / teacher BLEU", "size": "params (/ teacher)",
                "decoding": "flags / teacher BLEU"}


def entry(values, plain):
    """"mean ± std" of a cell's values, "(+d)" = mean - plain's mean when ``plain`` is given; "-" if none."""
    if not values:
        return "-"
    mu, sd = mean_std(values)
    return "%.2f ± %.2f%s" % (mu, sd, " (%+.2f)" % (mu - statistics.mean(plain)) if plain else "")


def report(records, args, cells):
    """Markdown: per axis, a BLEU table (mean ± std, Δ vs plain) and a chrF table; the signatures."""
    runs = select(records, args, cells)
    methods = [m for m in ("plain", "token", "sentence", "hybrid") if m in args.methods]
    lines = []
    for axis in AXES:
        for metric in ("bleu", "chrf"):
            lines += ["", "%s axis, %s (mean ± std over seeds%s)" % (
                axis, "BLEU" if metric == "bleu" else "chrF", "; in brackets: vs plain" if metric == "bleu" else ""),
                "", "| %s | n | %s | %s |" % (axis, MEASURE_HEAD[axis], " | ".join(methods)),
                "|---|---:|---|%s" % ("---:|" * len(methods))]
            for level, cell in axis_cells(cells, axis, args.axis_levels[axis]):
                rows = {m: runs.get((cell, m), []) for m in methods}
                plain = [r[metric] for r in rows.get("plain", [])]
                first = next((rs for rs in rows.values() if rs), None)
                lines.append("| %s%s | %d | %s | %s |" % (
                    level, " (centre)" if cell == "centre" else "", max(len(rs) for rs in rows.values()),
                    level_measure(first, axis) if first else "-",
                    " | ".join(entry([r[metric] for r in rs], plain if metric == "bleu" and m != "plain" else None)
                               for m, rs in rows.items())))
    sigs = {(r["bleu_signature"], r["chrf_signature"]) for rs in runs.values() for r in rs}
    lines += ["", "sacreBLEU: %s" % "; ".join("BLEU `%s`, chrF `%s`" % s for s in sorted(sigs))]
    return "\n".join(lines).lstrip("\n")


def plot(records, args, cells, out_dir):
    """DIR/study_AXIS.png: BLEU and BLEU - plain vs the axis's levels, one line per method, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = select(records, args, cells)
    methods = [m for m in ("plain", "token", "sentence", "hybrid") if m in args.methods]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for axis in AXES:
        levels = axis_cells(cells, axis, args.axis_levels[axis])
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for i, m in enumerate(methods):
            xs, ys, es, ds, des = [], [], [], [], []
            for x, (level, cell) in enumerate(levels):
                rs, plain = runs.get((cell, m), []), runs.get((cell, "plain"), [])
                if not rs:
                    continue
                mu, sd = mean_std([r["bleu"] for r in rs])
                xs.append(x), ys.append(mu), es.append(sd)
                paired = [r["bleu"] - p["bleu"] for r, p in zip(rs, plain) if r["seed"] == p["seed"]]
                d = mean_std(paired) if paired else (float("nan"), 0.0)
                ds.append(d[0]), des.append(d[1])
            offset = (i - (len(methods) - 1) / 2) * 0.04  # keep overlapping error bars apart
            left.errorbar([x + offset for x in xs], ys, yerr=es, marker="o", capsize=3, label=m, color="C%d" % i)
            right.errorbar([x + offset for x in xs], ds, yerr=des, marker="o", capsize=3, label=m, color="C%d" % i)
        for ax, title in ((left, "test BLEU"), (right, "BLEU - plain (same seed)")):
            ax.set_xticks(range(len(levels)), ["%s%s" % (lv, "\n(centre)" if cell == "centre" else "")
                                               for lv, cell in levels])
            ax.set_xlabel(axis)
            ax.set_title("%s vs %s (error bars: std over seeds)" % (title, axis), fontsize=10)
        right.axhline(0, color="grey", lw=0.8)
        left.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "study_%s.png" % axis)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


SIGNIFICANCE_CAPTION = (
    "paired bootstrap (seeds pooled; kdexp.mix.paired_bootstrap): BLEU(a) - BLEU(b) over 1,000 resamples of the "
    "cell's test sentences, each resample drawing the same sentence ids in every seed both methods have and "
    "scoring their hypotheses pooled into one corpus; shown: the mean over the resamples, their 2.5%-97.5% "
    "quantiles and p = the share of resamples <= 0. That mean is not the difference of the BLEU means in the "
    "axis tables above (pooled-corpus BLEU is not the mean of per-seed BLEU). The better single level: token or "
    "sentence, whichever has the higher mean BLEU in the cell.")


def significance(records, args, cells, resamples=1000):
    """Markdown: per cell, the paired bootstrap (kdexp.mix.paired_bootstrap, seeds pooled, the seeds both
    methods have) of token - sentence (the paper's comparison) and hybrid - the better single level: the mean
    over the resamples of the pooled-corpus BLEU difference (SIGNIFICANCE_CAPTION), not a difference of means."""
    from kdexp.mix import paired_bootstrap

    runs = select(records, args, cells)

    def compare(cell, a, b):
        ra, rb = runs.get((cell, a), []), runs.get((cell, b), [])
        seeds = sorted({r["seed"] for r in ra} & {r["seed"] for r in rb})
        if not seeds:
            return "-"
        hyps = [[read_lines(os.path.join(REPO, r["hyps"])) for r in rs if r["seed"] in seeds] for rs in (ra, rb)]
        d, lo, hi, p = paired_bootstrap(*hyps, read_lines(os.path.join(REPO, ra[0]["refs"])), resamples)
        return "%+.2f [%+.2f, %+.2f], p = %.3f (%d seeds)" % (d, lo, hi, p, len(seeds))

    lines = ["| cell | token - sentence: paired-bootstrap diff (mean [95% CI], p) | hybrid - better single level: "
             "paired-bootstrap diff (mean [95% CI], p) |", "|---|---|---|"]
    for cell, _ in cells:
        mean = {m: statistics.mean(r["bleu"] for r in runs[(cell, m)]) for m in ("token", "sentence")
                if runs.get((cell, m))}
        if len(mean) < 2:
            continue
        single = max(mean, key=mean.get)
        lines.append("| %s | %s | %s (vs %s) |" % (cell, compare(cell, "token", "sentence"),
                                                  compare(cell, "hybrid", single), single))
    return "\n".join(lines)


def trained_cells(cells):
    """The cells whose students were trained (the decoding cells decode the centre's students again)."""
    centre = cells[0][1]["decoding"]
    return [(cell, coords) for cell, coords in cells if coords["decoding"] == centre]


def mean_curve(rs):
    """[(updates, mean valid nll_loss over the runs)] at the epochs every run has."""
    n = min(len(r["valid"]) for r in rs)
    return [(rs[0]["valid"][i]["updates"], statistics.mean(r["valid"][i]["nll_loss"] for r in rs)) for i in range(n)]


def curves(records, args, cells):
    """Markdown: per trained cell and method, valid nll_loss (mean over seeds) at the first epoch, at 2/3 of
    the budget and at the end, and the share of the total drop made in the last third (near 0 = plateaued)."""
    runs = select(records, args, cells)
    lines = ["| cell | method | epochs | nll first | nll at 2/3 | nll last | last third's share of the drop |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for cell, _ in trained_cells(cells):
        for m in ORDER[::-1]:
            rs = [r for r in runs.get((cell, m), []) if r["valid"]]
            if not rs:
                continue
            c = mean_curve(rs)
            two_thirds = min(c, key=lambda uv: abs(uv[0] - 2 * c[-1][0] / 3))[1]
            drop = c[0][1] - c[-1][1]
            lines.append("| %s | %s | %d | %.3f | %.3f | %.3f | %s |" % (
                cell, m, len(c), c[0][1], two_thirds, c[-1][1],
                "%.0f%%" % (100 * (two_thirds - c[-1][1]) / drop) if drop > 0 else "-"))
    return "\n".join(lines)


def plot_curves(records, args, cells, out_dir):
    """DIR/study_valid.png: valid nll_loss vs updates, one panel per trained cell, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, trained = select(records, args, cells), trained_cells(cells)
    fig, axes = plt.subplots(1, len(trained), figsize=(3.2 * len(trained), 3.2), squeeze=False)
    for ax, (cell, _) in zip(axes[0], trained):
        for i, m in enumerate(ORDER[::-1]):
            rs = [r for r in runs.get((cell, m), []) if r["valid"]]
            if rs:
                ax.plot(*zip(*mean_curve(rs)), marker=".", label=m, color="C%d" % i)
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("updates")
    axes[0][0].set_ylabel("valid nll_loss (sentence: on teacher outputs)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "study_valid.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def arch_cost(vocab, layers, dim, ffn):
    """Parameters touched per target token (shared embedding / output projection, encoder and decoder
    layers): the proxy of a size's train time relative to the centre's."""
    enc = 4 * (dim * dim + dim) + 2 * dim * ffn + ffn + dim + 4 * dim
    dec = 8 * (dim * dim + dim) + 2 * dim * ffn + ffn + dim + 6 * dim
    return vocab * dim + layers * (enc + dec)


def estimate(mix_path, args, cells, vocab=4000):
    """Core-minutes of the grid from the 3-epoch train times of docs/mix_results.json (one thread each,
    two at a time, the demo's student): per method mean seconds x (updates / their updates) x the size's
    arch_cost ratio, plus decoding (the level's third of the test set) and the teacher's level decodings."""
    with open(mix_path) as f:
        mix = [r for r in json.load(f) if r["epochs"] == 3]
    per = {}
    for m in args.methods:
        rs = [r for r in mix if r["config"] == MIX_PROXY[m]]
        if not rs:
            return "no 3-epoch %s records in %s" % (MIX_PROXY[m], mix_path)
        per[m] = (statistics.mean(r["train_seconds"] for r in rs), statistics.mean(r["updates"] for r in rs))
    gold = [r for r in mix if r["config"] == "token-cache8"] or mix  # batched by the gold targets, like the teacher
    updates = args.updates or round(args.budget_epochs * statistics.mean(r["updates"] / 3 for r in gold))
    centre = args.sizes[len(args.sizes) // 2]
    factor = {n: arch_cost(vocab, *s[:3]) / arch_cost(vocab, *centre[:3]) for n, s in zip(args.size_names, args.sizes)}
    trainings = {(c["complexity"], c["size"]) for _, c in cells}
    decodes = len(cells)  # each cell decodes each student once, a third of the test set
    seeds = len(args.seeds)
    train = sum(per[m][0] * updates / per[m][1] * factor[size] for m in args.methods for _, size in trainings) * seeds
    decode = decodes * len(args.methods) * seeds * DECODE_SECONDS["student"] / 3 + \
        sum(c["size"] == cells[0][1]["size"] for _, c in cells) * DECODE_SECONDS["teacher"] / 3
    lines = ["| method | train s per run (centre size, %d updates) | runs |" % updates, "|---|---:|---:|"]
    lines += ["| %s | %.0f | %d |" % (m, per[m][0] * updates / per[m][1], len(trainings) * seeds) for m in args.methods]
    lines += ["", "size factors (per-token parameter cost vs the centre): %s" % ", ".join(
        "%s %.2f" % kv for kv in factor.items()),
        "total: training %.0f core-min + decoding %.0f core-min = %.0f core-min, about %.0f min wall with "
        "--jobs %d" % (train / 60, decode / 60, (train + decode) / 60, (train + decode) / 60 / args.jobs, args.jobs)]
    return "\n".join(lines)
