"""The benchmark's data, teacher and cache (benchmarks/bench_kd.py): the demo's corpus subsampled or a synthetic
copy-task corpus, the teacher given or trained for a few updates, its top-K cache and distilled targets."""
import math
import os
import re

from kdexp.pipeline import REPO, Pipeline, tool
from kdexp.recipes import MAX_LEN

import bench_runs  # its train_cmd by attribute: scripts/gpu_check.sh replaces it (--fp16)

DEMO_WORK = os.path.join(REPO, "work", "demo")
LS = ["--label-smoothing", "0.1"]  # the benchmark's own teacher (the demo's teacher criterion)


def fresh(out):
    """An empty ``out``: a corpus of another language pair left there by an earlier run would otherwise sit beside
    the new one, and fairseq's tools would pick either."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)


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
    fresh(out)
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
    fresh(out)
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
        own = ["--task", "translation", "--criterion", "label_smoothed_cross_entropy"] + LS
        cmd = bench_runs.train_cmd(a, data, own, a.teacher_updates, role="teacher", extra=[
            "--save-dir", p.path("teacher"), "--no-epoch-checkpoints", "--disable-validation"])
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


