"""The study's text-complexity levels (examples/study.py): a score per sentence, tercile thresholds, the
measures of each level, and each level's data as a subset of the demo's (binarized corpus, teacher-decoded
targets, top-K teacher cache) -- sliced, never recomputed, so every level shares the full run's teacher outputs.

Complexity score of a sentence pair: the length of its SOURCE side in BPE pieces (WORK/bpe/{split}.{src}, the
demo's sentencepiece segmentation): computed from the data alone, reproducible, and the quantity that drives
both the decoding length and the teacher's uncertainty on this corpus. Thresholds t1 <= t2 are the training
split's terciles: with s_(1) <= ... <= s_(n) the sorted training scores, t1 = s_(ceil(n/3)) and
t2 = s_(ceil(2n/3)); level 1 (low) holds score <= t1, level 2 (mid) t1 < score <= t2, level 3 (high) score > t2.
The same thresholds split valid and test, so a level is a scenario: its students train, validate and are tested
on its own pairs. Ties stay together (level sizes are near, not exactly, 1/3).

Measures reported per level and split: pairs, mean score, and the rare-subword rate = the share of source
pieces outside the ``rare_top`` most frequent pieces of the whole training source side (frequency ties broken by
the piece's string).
"""
import collections
import json
import math
import os
import shutil

import numpy as np

from kdexp.pipeline import StepFailed, read_lines, write_lines

LEVELS = ("low", "mid", "high")
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------- pure functions


def lengths(bpe_lines):
    """Complexity score of each sentence: its number of BPE pieces."""
    return [len(line.split()) for line in bpe_lines]


def tercile_thresholds(scores):
    """(t1, t2) = (s_(ceil(n/3)), s_(ceil(2n/3))) of the sorted scores (1-based order statistics)."""
    s = sorted(scores)
    n = len(s)
    return s[math.ceil(n / 3) - 1], s[math.ceil(2 * n / 3) - 1]


def level_of(score, thresholds):
    """0 (low) if score <= t1, 1 (mid) if score <= t2, else 2 (high)."""
    t1, t2 = thresholds
    return 0 if score <= t1 else 1 if score <= t2 else 2


def top_pieces(bpe_lines, n):
    """The n most frequent pieces (ties: alphabetical)."""
    counts = collections.Counter(piece for line in bpe_lines for piece in line.split())
    return {piece for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]}


def rare_rate(bpe_lines, top):
    """Share of the pieces of ``bpe_lines`` that are not in ``top`` (0 for no pieces)."""
    pieces = [piece for line in bpe_lines for piece in line.split()]
    return sum(piece not in top for piece in pieces) / len(pieces) if pieces else 0.0


def split_levels(p, rare_top):
    """{"thresholds", "rare_top", "ids": {level: {split: [sentence ids]}}, "measures": {level: {split: {pairs,
    mean_len, rare_rate}}}} from WORK/bpe (source side). StepFailed if a level of a split gets no pair."""
    src = p.args.src_lang
    bpe = {s: read_lines(p.path("bpe", "%s.%s" % (s, src))) for s in SPLITS}
    thresholds = tercile_thresholds(lengths(bpe["train"]))
    top = top_pieces(bpe["train"], rare_top)
    ids = {lv: {s: [] for s in SPLITS} for lv in LEVELS}
    for s in SPLITS:
        for i, n in enumerate(lengths(bpe[s])):
            ids[LEVELS[level_of(n, thresholds)]][s].append(i)
    empty = ["%s/%s" % (lv, s) for lv in LEVELS for s in SPLITS if not ids[lv][s]]
    if empty:
        raise StepFailed("step study-levels failed: complexity terciles %s of the source lengths leave no pairs "
                         "in %s (the corpus is too small or its lengths too uniform)"
                         % (list(thresholds), ", ".join(empty)))
    measures = {lv: {s: {"pairs": len(ids[lv][s]),
                         "mean_len": float(np.mean(lengths([bpe[s][i] for i in ids[lv][s]]))),
                         "rare_rate": rare_rate([bpe[s][i] for i in ids[lv][s]], top)} for s in SPLITS}
                for lv in LEVELS}
    return {"score": "source length in BPE pieces", "thresholds": list(thresholds), "rare_top": rare_top,
            "ids": ids, "measures": measures}


# ---------------------------------------------------------------- level data (subsets of the full run's files)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def subset_indexed(src_prefix, dst_prefix, ids):
    """Entries ``ids`` of a fairseq MMapIndexedDataset, in that order, as a new one (same dtype)."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

    ds = MMapIndexedDataset(src_prefix)
    builder = MMapIndexedDatasetBuilder(dst_prefix + ".bin", dtype=ds._index.dtype)
    for i in ids:
        builder.add_item(ds[i])
    builder.finalize(dst_prefix + ".idx")


def subset_data(p, lp, ids):
    """Level work directory ``lp``: data-bin (the demo's dictionaries, sliced splits) and corpus (raw text)."""
    a, pair = p.args, "%s-%s" % (p.args.src_lang, p.args.tgt_lang)
    os.makedirs(lp.path("data-bin"), exist_ok=True)
    os.makedirs(lp.path("corpus"), exist_ok=True)
    for lang in (a.src_lang, a.tgt_lang):
        shutil.copyfile(p.path("data-bin", "dict.%s.txt" % lang), lp.path("data-bin", "dict.%s.txt" % lang))
    for split in SPLITS:
        for lang in (a.src_lang, a.tgt_lang):
            subset_indexed(p.path("data-bin", "%s.%s.%s" % (split, pair, lang)),
                           lp.path("data-bin", "%s.%s.%s" % (split, pair, lang)), ids[split])
            lines = read_lines(p.path("corpus", "%s.%s" % (split, lang)))
            write_lines(lp.path("corpus", "%s.%s" % (split, lang)), [lines[i] for i in ids[split]])
    write_json(lp.path("ids.json"), ids)


def subset_distill(src_dir, dst_dir, prefix_name, ids, note):
    """kd-distill-corpus output (``prefix_name`` = {split}.{src}-{tgt}.{tgt}) restricted to ``ids``."""
    os.makedirs(dst_dir, exist_ok=True)
    src, dst = os.path.join(src_dir, prefix_name), os.path.join(dst_dir, prefix_name)
    subset_indexed(src, dst, ids)
    lines = read_lines(src + ".txt")
    write_lines(dst + ".txt", [lines[i] for i in ids])
    with open(src + ".json") as f:
        meta = json.load(f)
    meta.update(count=len(ids), split_size=len(ids), range=[0, len(ids)], subset=note)
    write_json(dst + ".json", meta)


def subset_cache(src_dir, dst_dir, split, ids, note):
    """A kd-dump-teacher top-K store (kd_plugin/data/teacher_cache.py: .lprobs.f16, .ids.*, .rest.f16, .idx,
    .json) restricted to sentences ``ids``: their rows in that order, new offsets, the header written last."""
    from kd_plugin.data.teacher_cache import (LPROBS_DTYPE, OFFSETS_DTYPE, cache_prefix, check_store,
                                              read_header, suffixes)

    src, dst = cache_prefix(src_dir, split), cache_prefix(dst_dir, split)
    os.makedirs(dst_dir, exist_ok=True)
    header = read_header(src)
    check_store(src, header)
    sfx, k = suffixes(header["ids_dtype"]), header["k"]
    offsets = np.fromfile(src + sfx["offsets"], dtype=OFFSETS_DTYPE)
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in ids]) if ids else np.zeros(0, np.int64)
    parts = {"lprobs": (LPROBS_DTYPE, k), "ids": (np.dtype(header["ids_dtype"]), k), "rest": (LPROBS_DTYPE, 1)}
    for part, (dtype, width) in parts.items():
        data = np.memmap(src + sfx[part], dtype=dtype, mode="r").reshape(-1, width)
        np.ascontiguousarray(data[rows]).tofile(dst + sfx[part])
    new_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[ids])]).astype(OFFSETS_DTYPE)
    new_offsets.tofile(dst + sfx["offsets"])
    header.update(count=len(ids), split_size=len(ids), range=[0, len(ids)], num_tokens=int(len(rows)), subset=note)
    write_json(dst + ".json", header)  # last: the commit marker
