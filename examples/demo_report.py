"""The demo's markdown report: one table (params, updates, train time, BLEU, chrF per system) and everything
needed to reproduce it (command, machine, data and its cleaning, sizes, criteria, decoding, sacreBLEU
signatures)."""
import datetime
import os
import platform
import shlex
import sys
import time

import build_corpus
from demo_data import SPLITS, full_corpus_dir
from demo_pipeline import REPO, read_lines


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "%d x %s (%s)" % (os.cpu_count() or 0, model, platform.platform())


def command_line(a):
    env = "QUICK=1 " if a.quick and os.environ.get("QUICK") else ""
    return env + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + sys.argv)


def title(a):
    corpus = "`%s`" % os.path.basename(a.data) if a.data else "LibreOffice help"
    pair = "%s -> %s" % (a.src_lang, a.tgt_lang) if a.data else "German -> English"
    return "# kd-plugin demo: %s, %s%s" % (pair, corpus, " (QUICK smoke run)" if a.quick else "")


def cleaning_line(p):
    """The cleaning counts recorded by build_corpus, or None for a corpus built before they were recorded."""
    record = build_corpus.read_cleaning(full_corpus_dir(p))
    if record is None:
        return None
    return "- Cleaning (examples/build_corpus.py, Moses clean-corpus-n style): %s" % build_corpus.cleaning_summary(
        record["read"], record["kept"], record["dropped"], record["limits"])


def report(p, results, criteria, decode_cmd, threads_per_student):
    """The markdown results. ``criteria``: {student: its fairseq-train arguments}; ``decode_cmd``: the
    test decoding command of a system called SYSTEM; ``threads_per_student``: OpenMP threads of each."""
    a = p.args
    teacher_train = p.seconds.get("train-teacher", 0.0)
    rows = ["| system | params | updates | train time (s) | BLEU | chrF |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = "teacher" if name == "teacher" else "student: " + name
        rows.append("| %s | %s | %d | %.0f | %.1f | %.1f |" % (
            label, "{:,}".format(r["params"]), r["updates"], p.seconds.get("train-" + name, 0.0), r["bleu"], r["chrf"]))
    distill = sum(p.seconds.get("distill-" + s, 0.0) for s in ("train", "valid"))
    sizes = {s: len(read_lines(p.path("corpus", "%s.%s" % (s, a.tgt_lang)))) for s in SPLITS}
    first = next(iter(results.values()))
    lines = [
        title(a),
        "",
        "\n".join(rows),
        "",
        "- Command: `%s`" % command_line(a),
        "- Date: %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "- Machine: %s; threads per process: teacher and its test decoding %d, distillation shards 1, students "
        "(training and test decoding) %d, %d students at a time"
        % (machine(), a.threads or _torch_threads(), threads_per_student, a.jobs),
        "- Data: %s; train %d / valid %d / test %d pairs; joint sentencepiece BPE %d"
        % ("`%s` (%s -> %s)" % (a.data, a.src_lang, a.tgt_lang) if a.data
           else "Debian libreoffice-help-de + libreoffice-help-en-us (MPL-2.0)",
           sizes["train"], sizes["valid"], sizes["test"], a.bpe_size),
    ]
    lines += [line for line in [cleaning_line(p)] if line]
    lines += [
        "- Teacher: transformer %s, %s epochs (%.0f s)" % (arch(a, "teacher"), a.teacher_epochs, teacher_train),
        "- Students (all): transformer %s, %s epochs, same seed, lr and --max-tokens (students that train on "
        "teacher-decoded targets batch by those targets' lengths, so their update counts differ)"
        % (arch(a, "student"), a.student_epochs),
        "- Shared: adam lr %s, inverse_sqrt warmup %s, max-tokens %s, dropout %s, seed %s%s"
        % (a.lr, a.warmup, a.max_tokens, a.dropout, a.seed, ", max-update %s" % a.max_update if a.max_update else ""),
        "- Student criteria: %s" % "; ".join("%s: `%s`" % (s, " ".join(map(repo_relative, args)))
                                             for s, args in criteria.items()),
    ]
    if distill:
        lines.append("- Teacher distillation of train+valid (kd-distill-corpus, beam %d): %.0f s, "
                     "not included in the sentence/hybrid train times" % (a.distill_beam, distill))
    wall = time.time() - p.t0
    reused = "; steps reused from earlier runs (not in this time): %s" % ", ".join(p.reused) if p.reused else ""
    lines += [
        "- Wall time of this run: %.0f s (%.1f min)%s" % (wall, wall / 60, reused),
        "- Decoding: stock `%s` (no --user-dir)" % " ".join(map(repo_relative, decode_cmd)),
        "- sacreBLEU: BLEU `%s`, chrF `%s`" % (first["bleu_signature"], first["chrf_signature"]),
        "",
    ]
    return "\n".join(lines)


def arch(a, role):
    return "layers %s+%s, d=%s, ffn %s, %s heads" % tuple(
        getattr(a, "%s_%s" % (role, k)) for k in ("layers", "layers", "dim", "ffn", "heads"))


def repo_relative(arg):
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg


def _torch_threads():
    import torch

    return torch.get_num_threads()
