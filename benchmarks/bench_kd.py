#!/usr/bin/env python3
r"""Speed and peak memory of kd-plugin's criteria, as ratios to fairseq's own label_smoothed_cross_entropy.

    make bench                                  # PYTHONPATH=examples .venv/bin/python benchmarks/bench_kd.py
    PYTHONPATH=examples python benchmarks/bench_kd.py --rounds 5 --warmup 10 --updates 40
    PYTHONPATH=examples python benchmarks/bench_kd.py --data-bin DIR --teacher T.pt   # a real corpus and teacher
    PYTHONPATH=examples python benchmarks/bench_kd.py --synthetic     # ignore the demo's data and teacher

(PYTHONPATH=examples: the examples' library, kdexp, holds the demo's sizes, steps and the configurations.)

Preparation (cached under --work, redone when its arguments change):
  data     --data-bin DIR; else work/demo/data-bin when the demo's teacher checkpoint exists too; else a
           synthetic corpus (4000-type vocabulary, demo-like sentence lengths, target = source). Train and
           valid are subsampled to --train-sentences / --valid-sentences and re-binarized (same dictionaries);
  teacher  --teacher T.pt, else the demo's, else the demo's teacher architecture trained --teacher-updates
           updates here (a valid checkpoint of the right size: its cost, not its quality, is measured);
  cache    kd-dump-teacher --topk K and kd-distill-corpus (train, valid) into ONE directory: --teacher-cache
           of the cached runs (both signals for hybrid_kd), --teacher-targets of the others.
Measurement: --rounds rounds; each round runs every configuration (order rotated per round) as a fresh
fairseq-train (the demo's student and optimizer, --max-tokens 1500), --warmup + --updates updates, with
OMP_NUM_THREADS=--threads (default 1: on a shared machine oversubscribed OpenMP threads wreck timings).
Per run: words/s = fairseq's wps over the train_inner intervals after the warm-up; words/CPU-s = the same
tokens over the child's CPU time between those lines (robust to waiting for a shared core); peak RSS =
ru_maxrss of that child alone (os.wait4). Reported as ratios to the plain run of the same round (median,
min-max). Online-teacher runs are compared to FLOPs floors (:func:`floors`). A loss-level probe (:func:`probe`)
measures the extra peak memory of each loss in units of one (tokens x vocab) fp32 tensor.
Every configuration and probe (kdexp/configs.py's BENCH and PROBES) spells out every flag of its criterion: no
measurement depends on a criterion default.
Results: a markdown section written between the BEGIN/END markers of --output (docs/PERFORMANCE.md); the raw
numbers in WORK/results.json (each run with its full fairseq-train command, train_cmd), every run's log in
WORK/logs.
"""
import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

try:  # the examples' library: make bench runs with PYTHONPATH=examples
    from kdexp import report as demo_report
    from kdexp.configs import BENCH as CONFIGS, PROBES, ConfigError
    from kdexp.options import DEFAULTS
    from kdexp.pipeline import REPO, Pipeline, StepFailed, repo_relative, tool, write_lines
    from kdexp.recipes import MAX_LEN, model_args
except ModuleNotFoundError as e:
    if e.name != "kdexp":
        raise
    sys.exit("bench_kd: the examples' library kdexp is not importable: run `make bench` or "
             "PYTHONPATH=examples %s benchmarks/bench_kd.py" % os.path.relpath(sys.executable))

USER_DIR = os.path.join(REPO, "kd_plugin")
DEMO_WORK = os.path.join(REPO, "work", "demo")
BEGIN, END = "<!-- bench_kd.py: BEGIN (generated, do not edit) -->", "<!-- bench_kd.py: END -->"

LS = ["--label-smoothing", "0.1"]  # the benchmark's own teacher (the demo's teacher criterion)
# targets: configuration prefix -> (minimum words/s ratio, the FLOPs floor it multiplies: a key of floors(), or None)
SPEED_TARGETS = {"sentence": (0.97, None), "token-cache": (0.90, None),
                 "token-online": (0.90, "token"), "hybrid-online": (0.85, "hybrid")}
RSS_TARGET = 1.3


# ---------------------------------------------------------------------------------------------- data


def write_split(prefix, sentences, vocab_size):
    """Binarize lists of token ids (eos included) as fairseq-preprocess does (mmap indexed dataset)."""
    import torch
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=vocab_size)
    for ids in sentences:
        builder.add_item(torch.as_tensor(ids, dtype=torch.int32))
    builder.finalize(prefix + ".idx")


def split_langs(data_bin):
    """(src, tgt) of a binarized data dir, from its train.{src}-{tgt}.{src}.idx."""
    for name in sorted(os.listdir(data_bin)):
        m = re.match(r"train\.([^.-]+)-([^.]+)\.([^.]+)\.idx$", name)
        if m and m.group(3) == m.group(1):
            return m.group(1), m.group(2)
    raise SystemExit("bench_kd: %s holds no train.SRC-TGT.SRC.idx (not a fairseq-preprocess output)" % data_bin)


def subset_data_bin(source, out, n_train, n_valid, seed):
    """``source``'s dictionaries and a random subset (in corpus order) of its train and valid splits."""
    import shutil

    import numpy as np
    from fairseq.data import Dictionary, data_utils

    src, tgt = split_langs(source)
    os.makedirs(out, exist_ok=True)
    for lang in (src, tgt):
        shutil.copy(os.path.join(source, "dict.%s.txt" % lang), os.path.join(out, "dict.%s.txt" % lang))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        name = "%s.%s-%s." % (split, src, tgt)
        data = {lang: data_utils.load_indexed_dataset(os.path.join(source, name + lang), None) for lang in (src, tgt)}
        total = len(data[src])
        keep = np.sort(rng.choice(total, n, replace=False)) if 0 < n < total else np.arange(total)
        for lang in (src, tgt):
            vocab = len(Dictionary.load(os.path.join(source, "dict.%s.txt" % lang)))
            write_split(os.path.join(out, name + lang), (data[lang][int(i)] for i in keep), vocab)


def synthetic_corpus(out, vocab_size, n_train, n_valid, seed):
    r"""A synthetic translation task with a joint ``vocab_size`` dictionary (specials included).

    Words are Zipf-distributed (p ~ 1 / (rank + 2.7)^1.1), sentence lengths log-normal with the demo
    corpus's median 16 and mean 23 BPE tokens, clipped to [2, 128] (about its 99th percentile); the target
    is a copy of the source. See OWN_TEACHER_DECODING for how the teacher-decoded targets get its lengths.
    """
    import numpy as np
    from fairseq.data import Dictionary

    d = Dictionary()
    words = vocab_size - len(d)
    for i in range(words):
        d.add_symbol("w%d" % i, n=words - i)
    os.makedirs(out, exist_ok=True)
    for lang in ("src", "tgt"):
        d.save(os.path.join(out, "dict.%s.txt" % lang))
    rng = np.random.default_rng(seed)
    zipf = 1.0 / (np.arange(words) + 2.7) ** 1.1
    zipf /= zipf.sum()
    for split, n in (("train", n_train), ("valid", n_valid)):
        lengths = np.clip(np.round(rng.lognormal(math.log(16), 0.85, n)), 2, 128).astype(int)
        sents = [list(rng.choice(words, size=length, p=zipf) + d.nspecial) + [d.eos()] for length in lengths]
        for lang in ("src", "tgt"):
            write_split(os.path.join(out, "%s.src-tgt.%s" % (split, lang)), sents, len(d))


def corpus_stats(data_bin, cache=None):
    """Sentence counts and mean lengths (eos included) of the train split; vocabulary size."""
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    def lengths(prefix):  # copied out while the dataset (which unmaps its files when deleted) is alive
        dataset = data_utils.load_indexed_dataset(prefix, None)
        return np.array(dataset.sizes, dtype=np.float64)

    src, tgt = split_langs(data_bin)
    sizes = {lang: lengths(os.path.join(data_bin, "train.%s-%s.%s" % (src, tgt, lang))) for lang in (src, tgt)}
    stats = {"src": src, "tgt": tgt, "sentences": len(sizes[src]), "vocab": len(Dictionary.load(
        os.path.join(data_bin, "dict.%s.txt" % tgt)))}
    for key, s in (("src", sizes[src]), ("tgt", sizes[tgt])):
        # mean length, and the token-weighted mean context length E[n^2] / E[n] seen by attention
        stats[key + "_len"], stats[key + "_ctx"] = s.mean(), (s * s).sum() / s.sum()
        stats[key + "_tokens"] = int(s.sum())
    if cache:
        stats["distilled_tokens"] = int(lengths(os.path.join(cache, "train.%s-%s.%s" % (src, tgt, tgt))).sum())
    return stats


# ---------------------------------------------------------------------------------------------- FLOPs


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


# ---------------------------------------------------------------------------------------------- runs


def _cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_INNER = re.compile(r"\| train_inner \| epoch (\d+):.*num_updates=(\d+)")


def run_measured(cmd, log_path, env, warmup, last):
    """Run fairseq-train ``cmd`` (output to ``log_path``, env with PYTHONUNBUFFERED=1) and measure it:
    exit status, wall seconds, peak RSS (bytes, ru_maxrss of this child alone: os.wait4) and the child's
    CPU seconds between its train_inner lines at ``warmup`` and ``last`` updates (the log is polled every
    20 ms and /proc/PID/stat read when a line appears; CPU time does not count waiting for a shared core).
    """
    start, cpu, pos = time.time(), {}, 0
    with open(log_path, "w") as log:
        log.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while True:
            with open(log_path, "rb") as f:
                f.seek(pos)
                data = f.read()
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            pos += len(data)
            lines = data.decode("utf-8", errors="replace")
            for m in _INNER.finditer(lines):
                if int(m.group(2)) in (warmup, last) and int(m.group(2)) not in cpu:
                    cpu[int(m.group(2))] = _cpu_seconds(proc.pid)  # readable until the child is reaped
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu.setdefault(last, usage.ru_utime + usage.ru_stime)  # (missed the line: the whole run, a slight excess)
    return {"rc": proc.returncode, "wall": time.time() - start, "rss": usage.ru_maxrss * 1024,
            "cpu": cpu[last] - cpu[warmup] if warmup in cpu else None}


def measured_tokens(log_path, warmup):
    """(tokens, fairseq words/s, sentences/s) of the train_inner intervals after ``warmup`` updates, the
    words/s being sum(tokens) / sum(tokens / wps): each line covers the updates since the previous one, wpb
    tokens and bsz sentences each. Sentences/s is 1 / time per sentence, i.e. proportional to epochs/s:
    unlike words/s it does not depend on how long the targets trained on are (teacher outputs or gold).
    Refuses logs whose measured updates cross an epoch boundary (the split is too small).
    """
    tokens = seconds = sentences = 0.0
    last, epochs = 0, set()
    with open(log_path, errors="replace") as f:
        for line in f:
            if not _INNER.search(line):
                continue
            kv = dict(re.findall(r"(\w+)=([-+\d.e]+)", line))
            updates, done = int(kv["num_updates"]) - last, last
            last = int(kv["num_updates"])
            if done < warmup:
                continue
            epochs.add(_INNER.search(line).group(1))
            n = float(kv["wpb"]) * updates
            tokens, seconds = tokens + n, seconds + n / float(kv["wps"])
            sentences += float(kv["bsz"]) * updates
    if not tokens:
        raise RuntimeError("%s: no train_inner line after %d warm-up updates" % (log_path, warmup))
    if len(epochs) > 1:
        raise RuntimeError("%s: the measured updates span epochs %s: raise --train-sentences"
                           % (log_path, sorted(epochs)))
    return tokens, tokens / seconds, sentences / seconds


def train_cmd(a, data, criterion_args, max_update, role="student", extra=()):
    """fairseq-train: the demo's architecture of ``role`` and optimizer, the benchmark's batches and logging."""
    return [tool("fairseq-train"), data, "--source-lang", a.src, "--target-lang", a.tgt] \
        + [str(x) for x in model_args(a, role)] + list(criterion_args) + [
        "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(a.demo_warmup),
        "--warmup-init-lr", "1e-07",
        "--max-tokens", str(a.max_tokens), "--max-update", str(max_update), "--seed", str(a.seed),
        "--num-workers", "0", "--log-format", "simple", "--log-interval", str(a.log_interval),
        "--no-progress-bar"] + list(extra)


def config_args(a, name, paths):
    """The criterion/task flags of configuration ``name``, placeholders filled from ``paths``."""
    fields = dict(paths, user_dir=paths.get("user_dir", USER_DIR), topk=a.topk)
    return [x.format(**fields) for x in CONFIGS[name][1].flags()]


def config_cmd(a, name, paths):
    return train_cmd(a, paths["data"], config_args(a, name, paths), a.warmup + a.updates,
                     extra=["--no-save", "--disable-validation"])


# ---------------------------------------------------------------------------------------------- preparation


class Prep(Pipeline):
    """The demo's cached steps, but a step made with other arguments (or after a redone step) is redone."""

    redo = False

    def step(self, step, fn, cmd=None):
        done = self.cached(step)
        if done is not None and (self.redo or done.get("cmd") != cmd):
            os.remove(self.path("done", step + ".json"))
        if self.cached(step) is None:
            self.redo = True
        super().step(step, fn, cmd)


# kd-distill-corpus flags with the benchmark's own (barely trained) teacher: greedy, output cut at the source
# length (fairseq's limit is a x the longest source of the batch + b words, then eos; small length-sorted
# batches). Such a teacher does not emit eos, so its targets get the gold lengths of the synthetic copy task,
# as a converged teacher's would, in a fraction of a beam search's time; their words are junk, which costs
# training nothing extra. (A few hundred updates on the copy task do not teach the teacher eos: measured.)
OWN_TEACHER_DECODING = ["--beam", "1", "--max-len-a", "1", "--max-len-b", "-1", "--batch-size", "16"]


def prepare(a, p):
    """Data, teacher and cache; returns the paths the configurations use."""
    data = p.path("data-bin")
    demo_data = os.path.join(DEMO_WORK, "data-bin")
    demo_teacher = os.path.join(DEMO_WORK, "ckpt", "teacher", "checkpoint_last.pt")
    # the demo's data only with the demo's teacher: a teacher trained here for a few hundred updates on real
    # data decodes degenerate, short targets (measured: 0.64 x the gold tokens, and 450 s to distill 4000
    # sentences with the demo's beam), which would make sentence_kd's words/s a statement about that teacher
    use_demo = not a.synthetic and os.path.isdir(demo_data) and (a.teacher or os.path.isfile(demo_teacher))
    source = a.data_bin or (demo_data if use_demo else None)
    sizes = [a.train_sentences, a.valid_sentences, a.seed]
    if source:
        p.step("data", lambda: subset_data_bin(source, data, *sizes), ["subset", os.path.abspath(source)] + sizes)
    else:
        p.step("data", lambda: synthetic_corpus(data, a.vocab, *sizes), ["synthetic-copy-128", a.vocab] + sizes)
    a.source = source
    a.src, a.tgt = split_langs(data)
    teacher = a.teacher or (demo_teacher if source == demo_data and os.path.isfile(demo_teacher) else None)
    if teacher:
        teacher = os.path.abspath(teacher)
        p.step("teacher", lambda: None, ["given", teacher, os.path.getmtime(teacher)])
        a.decoding = ["--beam", str(a.distill_beam), "--max-tokens", "4000"] + MAX_LEN
    else:
        teacher = p.path("teacher", "checkpoint_last.pt")
        cmd = train_cmd(a, data, ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"] + LS,
                        a.teacher_updates, role="teacher",
                        extra=["--save-dir", p.path("teacher"), "--no-epoch-checkpoints", "--disable-validation"])
        cmd[cmd.index("--warmup-updates") + 1] = str(max(1, a.teacher_updates // 4))
        p.run("teacher", cmd)
        a.decoding = OWN_TEACHER_DECODING
    a.own_teacher, a.teacher_path = not a.teacher and teacher == p.path("teacher", "checkpoint_last.pt"), teacher
    cache = p.path("cache")
    for split in ("train", "valid"):
        common = ["--data", data, "--path", teacher, "--split", split, "--out", cache, "--overwrite"]
        p.run("dump-" + split, [tool("kd-dump-teacher")] + common + ["--topk", a.topk, "--max-tokens", 4000])
        p.run("distill-" + split, [tool("kd-distill-corpus")] + common + a.decoding)
    return {"data": data, "teacher": teacher, "cache": cache}


# ---------------------------------------------------------------------------------------------- loss probe

def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def probe(name, tokens, vocab, topk):
    r"""Extra peak RSS of one loss forward + backward, in units of one (tokens x vocab) float32 tensor.

    Inputs (not counted): the student logits (a leaf, as the output projection's output is) and the
    teacher's full log-probs; the peak is taken over the forward and backward (VmHWM, reset first).
    """
    import torch
    import torch.nn.functional as F
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from fairseq.data import Dictionary

    from kd_plugin.criterions.token_kd import TokenKDCriterion
    from kd_plugin.needs import TEACHER
    from kd_plugin.tasks.translation_kd import TranslationKDConfig, TranslationKDTask

    torch.manual_seed(0)
    bsz, length = tokens // 32, 32
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol("w%d" % i)
    logits = torch.randn(bsz, length, vocab).requires_grad_()
    teacher = {"lprobs": F.log_softmax(torch.randn(bsz, length, vocab), -1)}
    target = torch.randint(d.nspecial, vocab, (bsz, length))
    model = SimpleNamespace(get_normalized_probs=lambda out, log_probs: F.log_softmax(out[0].float(), -1),
                            get_targets=lambda sample, out: sample["target"])
    kw = PROBES[name][1]
    # built as fairseq builds it, from its config (every field given), with the real task class (no data, no
    # teacher: never loaded)
    crit = None if kw is None else TokenKDCriterion.build_criterion(CRITERION_DATACLASS_REGISTRY["token_kd"](
        sentence_avg=False, **{k: topk if v is None else v for k, v in kw.items()}),
        TranslationKDTask(TranslationKDConfig(data="unused"), d, d))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _rss("VmRSS")
    if crit is None:
        lprobs = model.get_normalized_probs((logits,), log_probs=True)
        loss, _ = label_smoothed_nll_loss(lprobs.view(-1, vocab), target.view(-1), 0.1, ignore_index=d.pad())
    else:
        ls, _, kd = crit.token_terms(model, (logits, None), {"target": target, TEACHER: teacher})
        loss = crit.token_loss(ls, kd)
    loss.backward()
    return (_rss("VmHWM") - base) / (tokens * vocab * 4)


def run_probes(a, env):
    """Each probe in a fresh interpreter (so allocator state does not leak between them)."""
    out = {}
    for name in PROBES:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", name, "--probe-tokens", str(a.probe_tokens),
               "--vocab", str(a.probe_vocab), "--topk", str(a.topk)]
        out[name] = float(subprocess.check_output(cmd, cwd=REPO, env=env, text=True).strip().splitlines()[-1])
    return out


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


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default=os.path.join(REPO, "work", "bench"), help="work directory")
    parser.add_argument("--data-bin", help="binarized data dir (default: work/demo/data-bin with the demo's "
                                           "teacher, else a synthetic corpus)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic corpus even if the demo's exists")
    parser.add_argument("--teacher", help="teacher checkpoint (default: the demo's, else one trained here)")
    parser.add_argument("--teacher-updates", type=int, default=30, help="updates of the benchmark's own teacher")
    parser.add_argument("--train-sentences", type=int, default=3500, help="train subset size (0: all)")
    parser.add_argument("--valid-sentences", type=int, default=100, help="valid subset size (0: all)")
    parser.add_argument("--vocab", type=int, default=4000, help="synthetic vocabulary size (specials included)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="updates before measuring (multiple of --log-interval)")
    parser.add_argument("--updates", type=int, default=40, help="measured updates")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--topk", type=int, default=8, help="K of the top-K runs and of the cache")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from %s" % list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every step and run (0: unset)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe-tokens", type=int, default=4096)
    parser.add_argument("--probe-vocab", type=int, default=4000)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "PERFORMANCE.md"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run one loss probe and print its result
    a = parser.parse_args(argv)
    for key, values in DEFAULTS.items():  # the demo's (full mode) model sizes, warm-up and beam
        if key.startswith(("teacher_", "student_")) or key in ("warmup", "distill_beam"):
            setattr(a, "demo_" + key if key == "warmup" else key, values[0])
    a.configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown or "plain" not in a.configs:
        parser.error("--configs: must include plain; unknown %s (choose from %s)" % (unknown, list(CONFIGS)))
    if a.warmup % a.log_interval or a.updates % a.log_interval or a.updates <= 0:
        parser.error("--warmup and --updates must be multiples of --log-interval (and --updates > 0)")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.probe:
        print(probe(a.probe, a.probe_tokens, a.probe_vocab, a.topk))
        return
    t0 = time.time()
    p = Prep(SimpleNamespace(work=a.work, threads=a.threads))
    env = p.env
    try:
        paths = prepare(a, p)
    except (StepFailed, ConfigError) as e:
        sys.exit("bench_kd: %s" % e)
    stats = corpus_stats(paths["data"], paths["cache"])
    fl = floors(a, stats)
    results = {name: [] for name in a.configs}
    for rnd in range(a.rounds):
        order = a.configs[rnd % len(a.configs):] + a.configs[:rnd % len(a.configs)]
        for name in order:
            log = p.path("logs", "run-r%d-%s.log" % (rnd, name))
            cmd = config_cmd(a, name, paths)
            r = run_measured(cmd, log, env, a.warmup, a.warmup + a.updates)
            r["train_cmd"] = [repo_relative(str(x)) for x in cmd]  # the full command, as run
            if r["rc"] != 0:
                with open(log, errors="replace") as f:
                    sys.stderr.write("".join(f.readlines()[-30:]))
                sys.exit("bench_kd: %s failed (exit %d); log: %s" % (name, r["rc"], log))
            tokens, r["wps"], r["sps"] = measured_tokens(log, a.warmup)
            r["cpu_wps"] = tokens / r["cpu"] if r["cpu"] else float("nan")
            results[name].append(r)
            p.progress("round %d" % rnd, "%-20s %7.0f words/s %7.0f words/CPU-s %5.0f MiB %4.0f s" % (
                name, r["wps"], r["cpu_wps"], r["rss"] / 2 ** 20, r["wall"]))
    with open(p.path("results.json"), "w") as f:
        json.dump({"results": results, "stats": stats, "floors": fl}, f, indent=1)
    p.progress("probe", "loss-level memory probes ...")
    probes = run_probes(a, env)
    section = report(a, paths, results, probes, stats, fl, time.time() - t0)
    write_report(a.output, section)
    print("\n" + section)
    p.progress("bench", "written to %s" % a.output)


if __name__ == "__main__":
    main()
