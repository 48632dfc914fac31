"""The benchmark's report (benchmarks/bench_kd.py): FLOPs floors of the online-teacher runs, ratios to the plain
run of each round against their targets, and the markdown section written between docs/PERFORMANCE.md's markers."""
import datetime
import os
import shlex
import statistics
import sys

from kdexp import report as demo_report
from kdexp.configs import BENCH as CONFIGS, PROBES
from kdexp.pipeline import REPO, write_lines

from bench_runs import USER_DIR, config_args

# targets: configuration prefix -> (minimum words/s ratio, the FLOPs floor it multiplies: a key of floors(), or None)
SPEED_TARGETS = {"sentence": (0.97, None), "token-cache": (0.90, None),
                 "token-online": (0.90, "token"), "hybrid-online": (0.85, "hybrid")}
RSS_TARGET = 1.3
BEGIN, END = "<!-- bench_kd.py: BEGIN (generated, do not edit) -->", "<!-- bench_kd.py: END -->"


def flops_per_token(layers, dim, ffn, vocab, stats):
    r"""Forward FLOPs of a transformer (--share-all-embeddings) per TARGET token, as 2 x multiply-adds,
    split into (encoder, decoder + output projection):

        F_enc = 2 r L [ 4 d^2 + 2 d f + 2 d n_s ]             r = source / target tokens of the data
        F_dec = 2 L [ 8 d^2 + 2 d f + 2 d (n_t + n_s) ] + 2 d V
    4 d^2 / 8 d^2: q/k/v/out projections of self- (and cross-) attention; 2 d f: the FFN; 2 d n: attention
    scores and weighted sum over n context tokens, n_s / n_t = token-weighted mean source / target length
    E[n^2] / E[n] (training computes the full masked n x n product); d V: the output projection (the shared
    embedding matrix, counted). Ignored: embedding lookups, layer norms, softmaxes, biases, padding.
    """
    r = stats["src_tokens"] / stats["tgt_tokens"]
    enc = 2 * r * layers * (4 * dim * dim + 2 * dim * ffn + 2 * dim * stats["src_ctx"])
    dec = 2 * layers * (8 * dim * dim + 2 * dim * ffn + 2 * dim * (stats["tgt_ctx"] + stats["src_ctx"]))
    return enc, dec + 2 * dim * vocab


def floors(a, stats):
    r"""Forward FLOPs per target token (student, teacher) and the speed floors of online-teacher runs:

        token_kd:  1 / (1 + F_T / (3 F_S))                      teacher forward vs student forward + backward
        hybrid_kd: 3 F_S / (3 F_S + 3 rho F_S,dec + F_T)        plus the student's second decoder pass, on the
                                                                teacher's targets (rho = their tokens / gold's)
    """
    student = flops_per_token(*(getattr(a, "student_" + k) for k in ("layers", "dim", "ffn")), stats["vocab"], stats)
    teacher = sum(flops_per_token(*(getattr(a, "teacher_" + k) for k in ("layers", "dim", "ffn")),
                                  stats["vocab"], stats))
    f_s, rho = sum(student), stats["distilled_tokens"] / stats["tgt_tokens"]
    return {"student": f_s, "student_dec": student[1], "teacher": teacher, "token": 1 / (1 + teacher / (3 * f_s)),
            "hybrid": 3 * f_s / (3 * f_s + 3 * rho * student[1] + teacher), "rho": rho}



# ---------------------------------------------------------------------------------------------- report


def fmt_ratio(values):
    values = [v for v in values if v == v]  # NaN: CPU time not measured
    if not values:
        return "n/a"
    return "%.3f [%.3f-%.3f]" % (statistics.median(values), min(values), max(values))


def speed_target(name, fl):
    """(threshold, description) of ``name``'s words/s target, or None."""
    for prefix, (ratio, floor) in SPEED_TARGETS.items():
        if name.startswith(prefix):
            return (ratio * fl[floor], ">= %.2f x floor = %.3f" % (ratio, ratio * fl[floor])) if floor \
                else (ratio, ">= %.2f" % ratio)
    return None


def verdict(values, threshold, higher=True):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    value = statistics.median(values)
    ok = value >= threshold if higher else value <= threshold
    return "met" if ok else "MISSED by %.1f%%" % (100 * abs(value - threshold) / threshold)


def ratios(results, name, key):
    return [r[key] / p[key] for r, p in zip(results[name], results["plain"])]


def report(a, paths, results, probes, stats, fl, seconds):
    names = list(results)
    shown = {k: os.path.relpath(v, REPO) for k, v in dict(paths, user_dir=USER_DIR).items()}
    rows = ["| configuration | words/s | words/s ratio | words/CPU-s ratio | speed target: words/s (CPU) | "
            "sentences/s ratio | peak RSS MiB | RSS ratio | memory <= %.1f |" % RSS_TARGET,
            "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for name in names:
        sp, cpu, sents, mem = (ratios(results, name, key) for key in ("wps", "cpu_wps", "sps", "rss"))
        target = speed_target(name, fl)
        speed = "%s: %s (%s)" % (target[1], verdict(sp, target[0]), verdict(cpu, target[0])) if target else "-"
        rows.append("| %s | %.0f | %s | %s | %s | %s | %.0f | %s | %s |" % (
            CONFIGS[name][0], statistics.median(r["wps"] for r in results[name]), fmt_ratio(sp), fmt_ratio(cpu),
            speed, fmt_ratio(sents), statistics.median(r["rss"] for r in results[name]) / 2 ** 20, fmt_ratio(mem),
            verdict(mem, RSS_TARGET, higher=False) if name != "plain" else "-"))
    probe_rows = ["| loss (forward + backward) | extra peak memory, in (tokens x vocab) fp32 tensors |", "|---|---:|"]
    probe_rows += ["| %s | %.2f |" % (PROBES[name][0], value) for name, value in probes.items()]
    data = ("synthetic (Zipf words, demo-like lengths, target = source)" if not a.source
            else "`%s`, a random subset" % os.path.relpath(a.source, REPO))
    role = lambda r: "%s layer(s), d=%s, ffn %s, %s heads" % tuple(
        getattr(a, "%s_%s" % (r, k)) for k in ("layers", "dim", "ffn", "heads"))
    lines = [
        BEGIN,
        "### Results",
        "",
        "Ratios to the plain run of the same round: median [min-max] over %d rounds." % a.rounds,
        "",
        "\n".join(rows),
        "",
        "FLOPs floors (forward FLOPs per target token: student F_S = %.2fM, of which decoder + output projection "
        "%.2fM; teacher F_T = %.2fM; `floors` in benchmarks/bench_kd.py): token_kd online "
        "1 / (1 + F_T / (3 F_S)) = **%.3f**; hybrid_kd online, which also runs the student's decoder on the "
        "teacher's targets (%.2f x the gold tokens), 3 F_S / (3 F_S + 3 x %.2f F_S,dec + F_T) = **%.3f**."
        % (fl["student"] / 1e6, fl["student_dec"] / 1e6, fl["teacher"] / 1e6, fl["token"], fl["rho"], fl["rho"],
           fl["hybrid"]),
        "",
        "Loss-level memory probe (%d tokens x %d vocab, one fresh process each; inputs = student logits and "
        "the teacher's full log-probs, not counted; peak = VmHWM over forward + backward):"
        % (a.probe_tokens, a.probe_vocab),
        "",
        "\n".join(probe_rows),
        "",
        "- Command: `PYTHONPATH=examples %s`" % " ".join(
            shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + sys.argv),
        "- Date: %s; total %.0f s" % (datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds),
        "- Machine: %s; nproc %d; torch threads %s%s" % (
            demo_report.machine(), os.cpu_count() or 0, demo_report._torch_threads(),
            "; runs with OMP_NUM_THREADS=%s" % a.threads if a.threads else ""),
        "- Data: %s; train %d sentences, %d source / %d target tokens (mean %.1f / %.1f, eos included), "
        "vocabulary %d; teacher-decoded train targets (kd-distill-corpus `%s`): %d tokens (%.2f x gold)"
        % (data, stats["sentences"], stats["src_tokens"], stats["tgt_tokens"], stats["src_len"], stats["tgt_len"],
           stats["vocab"], " ".join(a.decoding), stats["distilled_tokens"], fl["rho"]),
        "- Student: transformer %s (the demo's), %.2fM FLOPs/target token" % (role("student"), fl["student"] / 1e6),
        "- Teacher: transformer %s (the demo's), %.2fM FLOPs/target token, `%s`%s" % (
            role("teacher"), fl["teacher"] / 1e6, os.path.relpath(a.teacher_path, REPO),
            " (trained %d updates by the benchmark: its speed, not its quality, matters here)" % a.teacher_updates
            if a.own_teacher else ""),
        "- Runs: %d rounds x %d configurations, interleaved (order rotated per round); each a fresh fairseq-train, "
        "--max-tokens %d, adam, %d warm-up + %d measured updates, --log-interval %d, --no-save "
        "--disable-validation; top-K = %d. words/s: fairseq's wps over the train_inner intervals after the "
        "warm-up (target tokens trained on: the teacher's outputs for sentence_kd); words/CPU-s: the same tokens "
        "over the child's CPU time between those log lines (/proc); sentences/s: source sentences over the same "
        "time (proportional to epochs per second); peak RSS: ru_maxrss of the child (os.wait4)"
        % (a.rounds, len(names), a.max_tokens, a.warmup, a.updates, a.log_interval, a.topk),
        "- Configurations (fairseq-train DATA, the student's architecture and the flags above, plus): %s"
        % "; ".join("%s: `%s`" % (n, " ".join(config_args(a, n, shown))) for n in names),
        END,
    ]
    return "\n".join(lines)


def write_report(path, section):
    """Replace the generated section of ``path`` (between the markers), keeping the hand-written text."""
    text = open(path).read() if os.path.isfile(path) else "# Performance\n\n%s\n%s\n" % (BEGIN, END)
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + "\n\n%s\n%s\n" % (BEGIN, END)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_lines(path, (head + section + tail).rstrip("\n").split("\n"))


