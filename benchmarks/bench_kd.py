#!/usr/bin/env python3
r"""Speed and peak memory of kd-plugin's criteria, as ratios to fairseq's own label_smoothed_cross_entropy.

    make bench                                       # .venv/bin/python benchmarks/bench_kd.py
    python benchmarks/bench_kd.py --rounds 3 --warmup 10 --updates 40
    python benchmarks/bench_kd.py --data-bin DIR --teacher T.pt      # a real corpus and teacher
    python benchmarks/bench_kd.py --synthetic                        # ignore work/demo/data-bin

Preparation (cached under --work, redone when its arguments change):
  data     --data-bin DIR, else the demo's work/demo/data-bin, else a synthetic corpus (a 4000-type
           vocabulary with demo-like sentence lengths); its train/valid splits are subsampled to
           --train-sentences / --valid-sentences and re-binarized (same dictionaries);
  teacher  --teacher T.pt, else the demo's teacher checkpoint (with the demo's data), else the demo's
           teacher architecture trained for --teacher-updates on the benchmark data;
  cache    kd-dump-teacher --topk K (train, valid) and kd-distill-corpus (the demo's beam) into ONE
           directory, which is --teacher-cache for the cached runs and --teacher-targets for sentence_kd.
Measurement: --rounds rounds; each round runs every configuration (the order rotated per round) as a fresh
fairseq-train process, demo student architecture, same data and batches, --warmup + --updates updates.
words/s = fairseq's wps over the train_inner intervals after the warm-up (tokens / time of those intervals);
peak RSS = ru_maxrss of that child alone (os.wait4). Both are reported as ratios to the plain run of the
same round (median and min-max over rounds). Online-teacher runs are also compared to the FLOPs floor
    floor = 1 / (1 + F_teacher / (3 F_student))
(teacher forward vs. student forward + backward, F from :func:`flops_per_token`). A loss-level probe
(:func:`probe`) measures the extra peak memory of each loss in units of one (tokens x vocab) fp32 tensor.
Results: a markdown section written between the BEGIN/END markers of --output (docs/PERFORMANCE.md).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
import demo  # noqa: E402  (the demo's model sizes, beam, pipeline steps and machine description)

USER_DIR = os.path.join(REPO, "kd_plugin")
DEMO_WORK = os.path.join(REPO, "work", "demo")
BEGIN, END = "<!-- bench_kd.py: BEGIN (generated, do not edit) -->", "<!-- bench_kd.py: END -->"

# configuration -> (label, extra fairseq-train args formatted with {user_dir} {teacher} {cache} {topk})
KD = ["--user-dir", "{user_dir}", "--task", "translation_kd"]
LS = ["--label-smoothing", "0.1"]
CONFIGS = {
    "plain": ("plain label_smoothed_cross_entropy",
              ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"] + LS),
    "token-online-full": ("token_kd, online teacher, full vocab",
                          KD + ["--teacher-path", "{teacher}", "--criterion", "token_kd"] + LS),
    "token-online-topk": ("token_kd, online teacher, top-K",
                          KD + ["--teacher-path", "{teacher}", "--criterion", "token_kd", "--kd-topk", "{topk}"] + LS),
    "token-cache": ("token_kd, cached top-K",
                    KD + ["--teacher-cache", "{cache}", "--criterion", "token_kd", "--kd-topk", "{topk}"] + LS),
    "sentence": ("sentence_kd", KD + ["--teacher-targets", "{cache}", "--criterion", "sentence_kd"] + LS),
    "hybrid-online-full": ("hybrid_kd, online teacher, full vocab",
                           KD + ["--teacher-path", "{teacher}", "--teacher-targets", "{cache}",
                                 "--criterion", "hybrid_kd"] + LS),
    "hybrid-cache": ("hybrid_kd, cached top-K + targets",
                     KD + ["--teacher-cache", "{cache}", "--criterion", "hybrid_kd", "--kd-topk", "{topk}"] + LS),
}
# targets: configuration prefix -> (minimum words/s ratio, multiplied by the FLOPs floor?)
SPEED_TARGETS = {"sentence": (0.97, False), "token-cache": (0.90, False),
                 "token-online": (0.90, True), "hybrid-online": (0.85, True)}
RSS_TARGET = 1.3


# ---------------------------------------------------------------------------------------------- data


def write_split(prefix, sentences, vocab_size):
    """Binarize lists of token ids (eos included) as fairseq-preprocess does (mmap indexed dataset)."""
    import torch
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=vocab_size)
    for ids in sentences:
        builder.add_item(torch.IntTensor(ids))
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
    r"""A learnable synthetic translation task with a joint ``vocab_size`` dictionary (specials included).

    Source words w_i are Zipf-distributed (p ~ 1 / (rank + 2.7)^1.1), sentence lengths log-normal with the
    demo corpus's median 16 and mean 23 BPE tokens (clipped to [2, 250]); the target maps each word through
    a fixed permutation and swaps adjacent pairs, so a briefly trained teacher decodes sensible lengths.
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
    perm = rng.permutation(words)
    first = d.nspecial
    for split, n in (("train", n_train), ("valid", n_valid)):
        lengths = np.clip(np.round(rng.lognormal(math.log(16), 0.85, n)), 2, 250).astype(int)
        src_sents, tgt_sents = [], []
        for length in lengths:
            s = rng.choice(words, size=length, p=zipf)
            t = perm[s].copy()
            t[: length // 2 * 2] = t[: length // 2 * 2].reshape(-1, 2)[:, ::-1].reshape(-1)
            src_sents.append(list(s + first) + [d.eos()])
            tgt_sents.append(list(t + first) + [d.eos()])
        for lang, sents in (("src", src_sents), ("tgt", tgt_sents)):
            write_split(os.path.join(out, "%s.src-tgt.%s" % (split, lang)), sents, len(d))


def corpus_stats(data_bin, cache=None):
    """Sentence counts and mean lengths (eos included) of the train split; vocabulary size."""
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    src, tgt = split_langs(data_bin)
    sizes = {lang: np.asarray(data_utils.load_indexed_dataset(
        os.path.join(data_bin, "train.%s-%s.%s" % (src, tgt, lang)), None).sizes, dtype=np.float64)
        for lang in (src, tgt)}
    stats = {"src": src, "tgt": tgt, "sentences": len(sizes[src]), "vocab": len(Dictionary.load(
        os.path.join(data_bin, "dict.%s.txt" % tgt)))}
    for key, s in (("src", sizes[src]), ("tgt", sizes[tgt])):
        # mean length, and the token-weighted mean context length E[n^2] / E[n] seen by attention
        stats[key + "_len"], stats[key + "_ctx"] = s.mean(), (s * s).sum() / s.sum()
        stats[key + "_tokens"] = int(s.sum())
    if cache:
        distilled = data_utils.load_indexed_dataset(os.path.join(cache, "train.%s-%s.%s" % (src, tgt, tgt)), None)
        stats["distilled_tokens"] = int(np.asarray(distilled.sizes).sum())
    return stats


# ---------------------------------------------------------------------------------------------- FLOPs


def flops_per_token(layers, dim, ffn, vocab, stats):
    r"""Forward FLOPs of a transformer (--share-all-embeddings) per TARGET token, as 2 x multiply-adds:

        F = 2 [ r L (4 d^2 + 2 d f)          encoder: q/k/v/out projections + FFN, r = src / tgt tokens
              + L (8 d^2 + 2 d f)            decoder: self- and cross-attention projections + FFN
              + d V                          output projection (the shared embedding matrix, counted)
              + r L 2 d n_s + L 2 d (n_t + n_s) ]   attention scores and weighted sums
    n_s / n_t = token-weighted mean source / target length E[n^2] / E[n] (fairseq computes the full masked
    n x n product in training). Ignored: embeddings lookups, layer norms, softmaxes, biases, padding.
    """
    r = stats["src_tokens"] / stats["tgt_tokens"]
    macs = (r * layers * (4 * dim * dim + 2 * dim * ffn) + layers * (8 * dim * dim + 2 * dim * ffn)
            + dim * vocab + r * layers * 2 * dim * stats["src_ctx"]
            + layers * 2 * dim * (stats["tgt_ctx"] + stats["src_ctx"]))
    return 2 * macs


def model_flops(a, role, stats):
    return flops_per_token(getattr(a, role + "_layers"), getattr(a, role + "_dim"), getattr(a, role + "_ffn"),
                           stats["vocab"], stats)


# ---------------------------------------------------------------------------------------------- runs


def run_measured(cmd, log_path, env):
    """Run ``cmd`` (output to ``log_path``); (exit status, wall seconds, peak RSS in bytes of this child)."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - start, usage.ru_maxrss * 1024  # Linux: ru_maxrss in KiB



_INNER = re.compile(r"\| train_inner \| epoch (\d+):")


def measured_wps(log_path, warmup):
    """Words/s over the train_inner intervals after ``warmup`` updates: sum(tokens) / sum(tokens / wps).

    A train_inner line covers the updates since the previous one (wpb tokens each, at its wps).
    Refuses logs whose measured updates cross an epoch boundary (the split is too small).
    """
    tokens = seconds = 0.0
    last, epochs = 0, set()
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _INNER.search(line)
            if not m:
                continue
            kv = dict(re.findall(r"(\w+)=([-+\d.e]+)", line))
            updates, done = int(kv["num_updates"]) - last, last
            last = int(kv["num_updates"])
            if done < warmup:
                continue
            epochs.add(m.group(1))
            n = float(kv["wpb"]) * updates
            tokens, seconds = tokens + n, seconds + n / float(kv["wps"])
    if not tokens:
        raise RuntimeError("%s: no train_inner line after %d warm-up updates" % (log_path, warmup))
    if len(epochs) > 1:
        raise RuntimeError("%s: the measured updates span epochs %s: raise --train-sentences"
                           % (log_path, sorted(epochs)))
    return tokens / seconds


def train_cmd(a, data, criterion_args, max_update, role="student", extra=()):
    """fairseq-train with the demo's architecture of ``role`` and its optimizer; no checkpoints, no validation."""
    return [demo.tool("fairseq-train"), data, "--source-lang", a.src, "--target-lang", a.tgt] \
        + [str(x) for x in demo.model_args(a, role)] + list(criterion_args) + [
        "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "400", "--warmup-init-lr", "1e-07",
        "--max-tokens", str(a.max_tokens), "--max-update", str(max_update), "--seed", str(a.seed),
        "--num-workers", "0", "--log-format", "simple", "--log-interval", str(a.log_interval),
        "--no-progress-bar"] + list(extra)


def config_cmd(a, name, paths):
    _, args = CONFIGS[name]
    fields = dict(paths, user_dir=USER_DIR, topk=a.topk)
    return train_cmd(a, paths["data"], [x.format(**fields) for x in args], a.warmup + a.updates,
                     extra=["--no-save", "--disable-validation"])


# ---------------------------------------------------------------------------------------------- preparation


class Prep(demo.Pipeline):
    """The demo's cached steps, but a step made with other arguments (or after a redone step) is redone."""

    redo = False

    def step(self, step, fn, cmd=None):
        done = self.cached(step)
        if done is not None and (self.redo or done.get("cmd") != cmd):
            os.remove(self.path("done", step + ".json"))
        if self.cached(step) is None:
            self.redo = True
        super().step(step, fn, cmd)


def prepare(a, p):
    """Data, teacher and cache; returns the paths the configurations use."""
    data = p.path("data-bin")
    demo_data = os.path.join(DEMO_WORK, "data-bin")
    source = a.data_bin or (None if a.synthetic or not os.path.isdir(demo_data) else demo_data)
    sizes = [a.train_sentences, a.valid_sentences, a.seed]
    if source:
        p.step("data", lambda: subset_data_bin(source, data, *sizes), ["subset", os.path.abspath(source)] + sizes)
    else:
        p.step("data", lambda: synthetic_corpus(data, a.vocab, *sizes), ["synthetic", a.vocab] + sizes)
    a.source = source
    a.src, a.tgt = split_langs(data)
    teacher = a.teacher
    demo_teacher = os.path.join(DEMO_WORK, "ckpt", "teacher", "checkpoint_last.pt")
    if not teacher and source == demo_data and os.path.isfile(demo_teacher):
        teacher = demo_teacher
    if teacher:
        teacher = os.path.abspath(teacher)
        p.step("teacher", lambda: None, ["given", teacher, os.path.getmtime(teacher)])
    else:
        teacher = p.path("teacher", "checkpoint_last.pt")
        cmd = train_cmd(a, data, ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"] + LS,
                        a.teacher_updates, role="teacher",
                        extra=["--save-dir", p.path("teacher"), "--no-epoch-checkpoints", "--disable-validation"])
        cmd[cmd.index("--warmup-updates") + 1] = str(max(1, a.teacher_updates // 4))
        p.run("teacher", cmd)
    a.teacher_path = teacher
    cache = p.path("cache")
    for split in ("train", "valid"):
        common = ["--data", data, "--path", teacher, "--split", split, "--out", cache, "--overwrite"]
        p.run("dump-" + split, [demo.tool("kd-dump-teacher")] + common + ["--topk", str(a.topk), "--max-tokens",
                                                                            "4000"])
        p.run("distill-" + split, [demo.tool("kd-distill-corpus")] + common + ["--max-tokens", "4000"] + demo.BEAM)
    return {"data": data, "teacher": teacher, "cache": cache}


# ---------------------------------------------------------------------------------------------- loss probe

# probe -> (label, TokenKDCriterion keywords or None for fairseq's label-smoothed CE alone)
PROBES = {
    "ls-ce": ("label_smoothed_cross_entropy (fairseq)", None),
    "token-full": ("token_kd, forward_kl, full vocab", {}),
    "token-topk": ("token_kd, forward_kl, top-K", {"kd_topk": None}),
    "token-js-full": ("token_kd, js, full vocab (generic path)", {"kd_divergence": "js"}),
}


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
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from fairseq.data import Dictionary

    from kd_plugin.criterions.token_kd import TokenKDCriterion

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
    crit = None if kw is None else TokenKDCriterion(
        SimpleNamespace(target_dictionary=d), sentence_avg=False, label_smoothing=0.1,
        **{k: topk if v is None else v for k, v in kw.items()})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _rss("VmRSS")
    if crit is None:
        lprobs = model.get_normalized_probs((logits,), log_probs=True)
        loss, _ = label_smoothed_nll_loss(lprobs.view(-1, vocab), target.view(-1), 0.1, ignore_index=d.pad())
    else:
        ls, _, kd = crit.token_terms(model, (logits, None), {"target": target, "teacher": teacher})
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


def summary(values):
    return statistics.median(values), min(values), max(values)


def fmt_ratio(values):
    med, lo, hi = summary(values)
    return "%.3f [%.3f-%.3f]" % (med, lo, hi)


def speed_target(name, floor):
    """(threshold, description) of ``name``'s words/s target, or None."""
    for prefix, (ratio, scaled) in SPEED_TARGETS.items():
        if name.startswith(prefix):
            return (ratio * floor, ">= %.2f x floor = %.3f" % (ratio, ratio * floor)) if scaled \
                else (ratio, ">= %.2f" % ratio)
    return None


def verdict(value, threshold, higher=True):
    ok = value >= threshold if higher else value <= threshold
    return "met" if ok else "MISSED by %.1f%%" % (100 * abs(value - threshold) / threshold)


def report(a, results, probes, stats, flops, seconds):
    names = list(results)
    floor = 1.0 / (1.0 + flops["teacher"] / (3 * flops["student"]))
    rows = ["| configuration | words/s (median) | words/s ratio: median [min-max] | speed target | "
            "peak RSS MiB (median) | RSS ratio: median [min-max] | memory target (<= %.1f) |" % RSS_TARGET,
            "|---|---:|---:|---|---:|---:|---|"]
    for name in names:
        wps = [r["wps"] for r in results[name]]
        rss = [r["rss"] for r in results[name]]
        sp = [r["wps"] / p["wps"] for r, p in zip(results[name], results["plain"])]
        mem = [r["rss"] / p["rss"] for r, p in zip(results[name], results["plain"])]
        target = speed_target(name, floor)
        speed = "%s: %s" % (target[1], verdict(statistics.median(sp), target[0])) if target else "-"
        memory = verdict(statistics.median(mem), RSS_TARGET, higher=False) if name != "plain" else "-"
        rows.append("| %s | %.0f | %s | %s | %.0f | %s | %s |" % (
            CONFIGS[name][0], statistics.median(wps), fmt_ratio(sp), speed, statistics.median(rss) / 2 ** 20, fmt_ratio(mem),
            memory))
    probe_rows = ["| loss (forward + backward) | extra peak memory, in (tokens x vocab) fp32 tensors |", "|---|---:|"]
    probe_rows += ["| %s | %.2f |" % (PROBES[name][0], value) for name, value in probes.items()]
    data = ("synthetic (%d-type joint vocabulary, Zipf words, demo-like lengths)" % stats["vocab"]
            if not a.source else "`%s` subset" % os.path.relpath(a.source, REPO))
    role = lambda r: "%s layer(s), d=%s, ffn %s, %s heads" % tuple(
        getattr(a, "%s_%s" % (r, k)) for k in ("layers", "dim", "ffn", "heads"))
    lines = [
        BEGIN,
        "## Results: words/s and peak RSS as ratios to fairseq's label_smoothed_cross_entropy",
        "",
        "\n".join(rows),
        "",
        "FLOPs floor for online-teacher runs: 1 / (1 + F_teacher / (3 F_student)) = 1 / (1 + %.2fM / (3 x %.2fM))"
        " = **%.3f** (forward FLOPs per target token, `flops_per_token` in benchmarks/bench_kd.py)."
        % (flops["teacher"] / 1e6, flops["student"] / 1e6, floor),
        "",
        "Loss-level memory probe (%d tokens x %d vocab, one fresh process each; inputs = student logits and "
        "the teacher's full log-probs, not counted):" % (a.probe_tokens, a.probe_vocab),
        "",
        "\n".join(probe_rows),
        "",
        "- Command: `%s`" % " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + sys.argv),
        "- Date: %s; total %.0f s" % (datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seconds),
        "- Machine: %s; nproc %d; torch threads %s%s" % (demo.machine(), os.cpu_count() or 0, demo._torch_threads(),
                                                        "; OMP_NUM_THREADS=%s" % a.threads if a.threads else ""),
        "- Data: %s; train %d sentences, %d source / %d target tokens (mean %.1f / %.1f, eos included), "
        "vocabulary %d; teacher-decoded train targets: %d tokens (%.2f x gold)"
        % (data, stats["sentences"], stats["src_tokens"], stats["tgt_tokens"], stats["src_len"], stats["tgt_len"],
           stats["vocab"], stats["distilled_tokens"], stats["distilled_tokens"] / stats["tgt_tokens"]),
        "- Student: transformer %s (demo defaults), %.2fM FLOPs/target token" % (role("student"),
                                                                                flops["student"] / 1e6),
        "- Teacher: transformer %s, %.2fM FLOPs/target token, `%s`%s" % (
            role("teacher"), flops["teacher"] / 1e6, os.path.relpath(a.teacher_path, REPO),
            "" if a.teacher else " (trained %d updates by the benchmark)" % a.teacher_updates),
        "- Runs: %d rounds x %d configurations, interleaved (order rotated per round); each a fresh fairseq-train, "
        "--max-tokens %d, adam, %d warm-up + %d measured updates (words/s of the train_inner intervals after the "
        "warm-up, --log-interval %d), --no-save --disable-validation; top-K = %d; peak RSS = ru_maxrss of the "
        "child (os.wait4)" % (a.rounds, len(names), a.max_tokens, a.warmup, a.updates, a.log_interval, a.topk),
        "- Configurations: %s" % "; ".join(
            "%s: `%s`" % (n, " ".join(CONFIGS[n][1]).replace("{", "").replace("}", "")) for n in names),
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
    demo.write_lines(path, (head + section + tail).rstrip("\n").split("\n"))


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default=os.path.join(REPO, "work", "bench"), help="work directory")
    parser.add_argument("--data-bin", help="binarized data dir (default: work/demo/data-bin if present, else "
                                           "a synthetic corpus)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic corpus even if the demo's exists")
    parser.add_argument("--teacher", help="teacher checkpoint (default: the demo's, else one trained here)")
    parser.add_argument("--teacher-updates", type=int, default=300, help="updates of the benchmark's own teacher")
    parser.add_argument("--train-sentences", type=int, default=4000, help="train subset size (0: all)")
    parser.add_argument("--valid-sentences", type=int, default=100, help="valid subset size (0: all)")
    parser.add_argument("--vocab", type=int, default=4000, help="synthetic vocabulary size (specials included)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="updates before measuring (multiple of --log-interval)")
    parser.add_argument("--updates", type=int, default=40, help="measured updates")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--topk", type=int, default=8, help="K of the top-K runs and of the cache")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from %s" % list(CONFIGS))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: unset)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe-tokens", type=int, default=4096)
    parser.add_argument("--probe-vocab", type=int, default=4000)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "PERFORMANCE.md"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run one loss probe and print its result
    a = parser.parse_args(argv)
    for key, values in demo.DEFAULTS.items():  # the demo's (full mode) model sizes
        setattr(a, key, values[0])
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
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
    p = Prep(SimpleNamespace(work=a.work))
    try:
        paths = prepare(a, p)
    except demo.StepFailed as e:
        sys.exit("bench_kd: %s" % e)
    stats = corpus_stats(paths["data"], paths["cache"])
    flops = {r: model_flops(a, r, stats) for r in ("student", "teacher")}
    results = {name: [] for name in a.configs}
    for rnd in range(a.rounds):
        order = a.configs[rnd % len(a.configs):] + a.configs[:rnd % len(a.configs)]
        for name in order:
            log = p.path("logs", "run-r%d-%s.log" % (rnd, name))
            rc, wall, rss = run_measured(config_cmd(a, name, paths), log, env)
            if rc != 0:
                with open(log, errors="replace") as f:
                    sys.stderr.write("".join(f.readlines()[-30:]))
                sys.exit("bench_kd: %s failed (exit %d); log: %s" % (name, rc, log))
            wps = measured_wps(log, a.warmup)
            results[name].append({"wps": wps, "rss": rss, "wall": wall})
            p.progress("round %d" % rnd, "%-20s %8.0f words/s  %6.0f MiB  %4.0f s" % (name, wps, rss / 2 ** 20, wall))
    with open(p.path("results.json"), "w") as f:
        json.dump({"results": results, "stats": stats, "flops": flops}, f, indent=1)
    p.progress("probe", "loss-level memory probes ...")
    probes = run_probes(a, env)
    section = report(a, results, probes, stats, flops, time.time() - t0)
    write_report(a.output, section)
    print("\n" + section)
    p.progress("bench", "written to %s" % a.output)


if __name__ == "__main__":
    main()
