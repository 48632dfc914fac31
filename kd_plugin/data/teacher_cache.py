r"""Offline teacher cache: the teacher's top-K log-probabilities for every gold target token of a split.

Written by ``kd-dump-teacher`` (kd_plugin/cli/dump_teacher.py); read by ``--task translation_kd
--teacher-cache DIR`` through :func:`load_teacher_cache` (no teacher is loaded then).

Layout for split S with N sentences and n target tokens (eos included), prefix DIR/S.topk:
  .lprobs.f16   float16 n x K   log p_k at temperature 1, sorted descending, NOT renormalized
  .ids.u16      uint16  n x K   their token ids (.ids.i32, int32, when the vocabulary exceeds 65536 types)
  .rest.f16     float16 n       log(1 - sum_k p_k), the log-mass outside the top-K
  .idx          int64   N + 1   offsets: sentence i is rows idx[i]:idx[i+1] (its gold target length)
  .json         header, written last (the commit marker): format, version, split, source/target_lang,
                split_size N, count, range, num_tokens n, k, ids_dtype, vocab_size, dictionary_md5
                (kd_plugin.checks.dictionary_checksum), teacher_sha256 / teacher_paths, batching, data,
                targets ("gold"; caches of retired versions dumped on teacher-decoded targets say "teacher"
                and are refused)
Raw little-endian arrays read with np.memmap; rows are in sentence-id order, so reading sample i is
O(1) and a merged sharded dump is the concatenation of its shards. Size: 4K + 2 bytes per token plus
8 per sentence, i.e. 34 bytes/token for K = 8.

The criterion compares teacher and student over K+1 bins, the K ids and the stored rest mass, and tempers
those bins at --kd-temperature (kd_plugin.signals): exact at T=1, an approximation of tempering the full
distribution otherwise (and for an ensemble the top-K of the averaged T=1 distribution stands in for the
tempered average).
"""
import json
import logging
import os

import numpy as np
import torch

from kd_plugin.checks import KDConfigError, check_finite, dictionary_checksum
from kd_plugin.needs import TEACHER
from kd_plugin.signals import topk_signal

logger = logging.getLogger(__name__)

FORMAT, VERSION = "kd-teacher-topk", 1
FLAG = "--teacher-cache"
FP16_MIN = float(np.finfo(np.float16).min)
LPROBS_DTYPE = np.dtype("<f2")
OFFSETS_DTYPE = np.dtype("<i8")


def ids_dtype(vocab_size):
    """The smallest integer type holding every token id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def cache_prefix(directory, split):
    return os.path.join(directory, "%s.topk" % split)


def has_cache(directory, split):
    return os.path.isfile(cache_prefix(directory, split) + ".json")


def suffixes(dtype):
    """File suffixes by part, in commit order (the header last)."""
    return {"lprobs": ".lprobs.f16", "ids": ".ids.u16" if np.dtype(dtype).itemsize == 2 else ".ids.i32",
            "rest": ".rest.f16", "offsets": ".idx", "header": ".json"}


def topk_and_rest(lprobs, k):
    r"""What the cache stores for full teacher log-probs (..., V): top-K (sorted) and the rest mass

        rest = log(1 - sum_k p_k) = logsumexp_{v not in top-K} log p_v      (kd_plugin.signals.topk_signal)
    clamped to the fp16 range (K = V: -65504). Returns (topk_lprobs, topk_ids, rest) shaped (..., K), (..., K), (...).
    """
    signal = topk_signal(lprobs, k)
    return signal["topk_lprobs"], signal["topk_ids"], signal["topk_rest"].clamp(min=FP16_MIN)


def to_fp16(x):
    """float log-probs -> float16 numpy, clamped to the finite fp16 range."""
    return x.clamp(min=FP16_MIN).to(torch.float16).cpu().numpy()


def read_header(prefix, flag=FLAG):
    """The header ``prefix.json``, or one clear KDConfigError naming it."""
    path = prefix + ".json"
    if not os.path.isfile(path):
        raise KDConfigError("%s: %s not found (make it with kd-dump-teacher)" % (flag, path))
    try:
        with open(path) as f:
            header = json.load(f)
    except ValueError as e:
        raise KDConfigError("%s: %s is not a valid cache header (%s)" % (flag, path, e)) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise KDConfigError("%s: %s is not a %s v%d header" % (flag, path, FORMAT, VERSION))
    return header


def expected_sizes(header):
    """Bytes each file of a store must have, by part, from its header."""
    rows, k, dtype = header["num_tokens"], header["k"], np.dtype(header["ids_dtype"])
    return {"lprobs": rows * k * LPROBS_DTYPE.itemsize, "ids": rows * k * dtype.itemsize,
            "rest": rows * LPROBS_DTYPE.itemsize, "offsets": (header["count"] + 1) * OFFSETS_DTYPE.itemsize}


def check_store(prefix, header, flag=FLAG):
    """Every file exists with exactly the size the header promises (truncation is caught here), and the
    offsets run from 0 to num_tokens. Returns the per-sentence lengths (int64 array of ``count``)."""
    sfx = suffixes(header["ids_dtype"])
    for part, size in expected_sizes(header).items():
        path = prefix + sfx[part]
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != size:
            state = "is missing" if have is None else "has %d bytes" % have
            raise KDConfigError("%s: %s %s, its header %s.json promises %d%s" % (
                flag, path, state, prefix, size, " (truncated)" if have is not None and have < size else ""))
    offsets = np.fromfile(prefix + sfx["offsets"], dtype=OFFSETS_DTYPE)
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != header["num_tokens"] or (lengths < 0).any():
        raise KDConfigError("%s: %s%s does not hold offsets from 0 to %d" % (flag, prefix, sfx["offsets"],
                                                                            header["num_tokens"]))
    return lengths


class TeacherCache:
    """The ``teacher`` extra of KDLanguagePairDataset: a split's cached top-K, read lazily by sample id.

    Memory maps are opened on first use in each process and never pickled, so DataLoader workers
    (fork or spawn) open their own.
    """

    key = TEACHER  # the sample entry it fills, aligned with sample["target"] (collated before)
    sizes = None  # no effect on batching

    def __init__(self, prefix, k, dtype, pad, left_pad):
        self.prefix, self.k, self.dtype = prefix, k, np.dtype(dtype)
        self.files = {p: prefix + s for p, s in suffixes(self.dtype).items()}
        self.pad, self.left_pad = pad, left_pad
        self._maps = self._pid = None

    def __getstate__(self):
        return dict(self.__dict__, _maps=None, _pid=None)

    def _open(self):
        if self._maps is None or self._pid != os.getpid():
            self._maps = {
                "offsets": np.memmap(self.files["offsets"], dtype=OFFSETS_DTYPE, mode="r"),
                "lprobs": np.memmap(self.files["lprobs"], dtype=LPROBS_DTYPE, mode="r").reshape(-1, self.k),
                "ids": np.memmap(self.files["ids"], dtype=self.dtype, mode="r").reshape(-1, self.k),
                "rest": np.memmap(self.files["rest"], dtype=LPROBS_DTYPE, mode="r"),
            }
            self._pid = os.getpid()
        return self._maps

    def _rows(self, part, index):
        """Rows of sample ``index`` (its gold target length L) in ``part``, copied out of the memory map."""
        m = self._open()
        return np.array(m[part][m["offsets"][index]:m["offsets"][index + 1]])

    def __getitem__(self, index):
        """(log-probs L x K float16, ids L x K) of sample ``index``, L its gold target length."""
        return self._rows("lprobs", index), self._rows("ids", index)

    def collate(self, items, sample):
        """sample[key] = {"topk_lprobs": B x T x K float16, "topk_ids": B x T x K long,
        "topk_rest": B x T float16}, padded like sample["target"] (padding holds id 0 / log-prob 0; the
        criterion masks it). The rest rows are read here by sample id (items hold log-probs and ids).

        The log-probs stay in their stored float16: fairseq's Trainer casts float32 sample tensors to the
        training dtype (--fp16 / --bf16), so float32 here would be rounded to bf16 under --bf16; float16
        passes unchanged and kd_plugin.signals upcasts it to float32 before any arithmetic."""
        target = sample["target"]
        bsz, tgt_len = target.shape
        lprobs = np.zeros((bsz, tgt_len, self.k), dtype=LPROBS_DTYPE)
        ids = np.zeros((bsz, tgt_len, self.k), dtype=np.int64)
        rest = np.zeros((bsz, tgt_len), dtype=LPROBS_DTYPE)
        lengths = target.ne(self.pad).sum(1).tolist()
        for b, ((lp, ix), i, n) in enumerate(zip(items, sample["id"].tolist(), lengths)):
            if len(lp) != n:
                raise KDConfigError("%s: %s holds %d tokens for sample %d, its target has %d"
                                    % (FLAG, self.files["offsets"], len(lp), i, n))
            pos = slice(tgt_len - n, tgt_len) if self.left_pad else slice(0, n)
            lprobs[b, pos], ids[b, pos], rest[b, pos] = lp, ix, self._rows("rest", i)
        lprobs, rest = torch.from_numpy(lprobs), torch.from_numpy(rest)
        check_finite(lprobs, "%s: %s holds NaN/inf log-probs" % (FLAG, self.files["lprobs"]))
        check_finite(rest, "%s: %s holds NaN/inf log-probs" % (FLAG, self.files["rest"]))
        sample[self.key] = {"topk_lprobs": lprobs, "topk_ids": torch.from_numpy(ids), "topk_rest": rest}


def load_teacher_cache(directory, split, dataset, dictionary):
    """The cached top-K of ``split`` for ``dataset`` (a LanguagePairDataset), validated against it.

    Each mismatch is one KDConfigError naming the file and --teacher-cache: a header for another split,
    dictionary or number of sentences, a file whose size differs from what the header promises, and
    per-sentence token counts that differ from the gold target lengths.
    """
    prefix = cache_prefix(directory, split)
    if dataset.tgt_sizes is None:
        raise KDConfigError("%s: %s.json cannot serve the %s split: it has no targets" % (FLAG, prefix, split))
    header = _checked_header(prefix, split, dictionary, len(dataset), dataset.tgt_sizes)
    return TeacherCache(prefix, header["k"], header["ids_dtype"], dictionary.pad(),
                        getattr(dataset, "left_pad_target", False))


def _checked_header(prefix, split, dictionary, count, lengths):
    """The header of store ``prefix``, checked against the split, the dictionary, the targets it was dumped
    on (gold), the number of sentences and each sentence's gold target length."""
    header = read_header(prefix)

    def refuse(msg, *args):
        raise KDConfigError("%s: %s.json %s" % (FLAG, prefix, msg % args))

    if header.get("split") != split:
        refuse("was dumped for the %r split, not %r", header.get("split"), split)
    if header.get("targets", "gold") != "gold":
        refuse("was dumped on the %s targets, not the gold ones (kd-dump-teacher --targets was retired after "
               "commit e6da8c8)", header.get("targets"))
    md5 = dictionary_checksum(dictionary)
    if header.get("dictionary_md5") != md5 or header.get("vocab_size") != len(dictionary):
        refuse("was dumped with another target dictionary (%s types, md5 %s; the task's has %d types, md5 %s)",
               header.get("vocab_size"), header.get("dictionary_md5"), len(dictionary), md5)
    if np.dtype(header["ids_dtype"]) != ids_dtype(len(dictionary)):
        refuse("stores token ids as %s, expected %s", header["ids_dtype"], ids_dtype(len(dictionary)).str)
    if header.get("shard") is not None or header.get("range") != [0, header.get("split_size")]:
        refuse("is one shard (range %s), not a whole split: run kd-dump-teacher merge", header.get("range"))
    if header["count"] != count:
        refuse("holds %d sentences but the %s split has %d", header["count"], split, count)
    stored = check_store(prefix, header)
    bad = np.flatnonzero(stored != np.asarray(lengths))
    if len(bad):
        refuse("holds %d tokens for sentence %d but its gold target has %d (%d sentences differ): it was "
               "made for other data", stored[bad[0]], bad[0], lengths[bad[0]], len(bad))
    logger.info("teacher cache %s: %s split, K=%d, %d sentences, %d tokens on the gold targets, teacher(s) %s",
                prefix, split, header["k"], header["count"], header["num_tokens"],
                ", ".join(header.get("teacher_paths", [])))
    return header


def check_cache_topk(directory, kd_topk):
    """Start-up check of a criterion's --kd-topk against K of every split cached in ``directory``.

    kd_topk > K is refused; kd_topk = 0 (all tokens) runs KD over the cached top-K (a warning says so).
    Returns the smallest K found, 0 if the directory holds no cache header.
    """
    ks = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".topk.json"):
            prefix = os.path.join(directory, name[: -len(".json")])
            k = read_header(prefix)["k"]
            if kd_topk > k:
                raise KDConfigError("--kd-topk %d exceeds K=%d of the %s %s.json: lower --kd-topk or dump "
                                    "again with kd-dump-teacher --topk %d" % (kd_topk, k, FLAG, prefix, kd_topk))
            ks.append(k)
    if ks and kd_topk == 0:
        logger.warning("--kd-topk 0 with %s: KD runs over the cached top-%d tokens, not the full vocabulary",
                       FLAG, min(ks))
    return min(ks) if ks else 0
