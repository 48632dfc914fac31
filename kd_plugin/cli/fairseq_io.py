"""fairseq I/O shared by kd-plugin's command-line tools.

* :func:`fairseq_config`, :func:`setup_task`, :func:`load_split` -- the stock ``translation`` task for a
  binarized data dir, configured by fairseq's own argument parser (every default is fairseq's), with
  clear errors.
* :func:`load_ensemble` -- teacher checkpoint(s) ``A.pt[:B.pt...]``, checked against the data dir's
  dictionaries (same errors as the ``translation_kd`` task), built in eval mode; :func:`teacher_info`.
* :func:`shard_range`, :func:`batch_iterator` -- shard I of N is the contiguous index range
  ``[floor(n I / N), floor(n (I+1) / N))`` of the split, batched by fairseq (length-sorted, fixed order);
  :class:`Progress` logs the rate.
* :func:`write_corpus` -- a teacher-decoded corpus (kd-distill-corpus, from the teacher or from text) written
  as fairseq-preprocess writes a split, with its .txt and .json (:data:`CORPUS_SUFFIXES`).
"""
import hashlib
import logging
import os
import time

import numpy as np
import torch
from fairseq import options, tasks, utils
from fairseq.data import BaseWrapperDataset, data_utils
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, data_file_path, index_file_path
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import outputs
from kd_plugin.teacher import load_members

logger = logging.getLogger("kd_plugin.cli")


def fairseq_config(data, source_lang=None, target_lang=None, *extra):
    """fairseq's full config for the stock ``translation`` task on ``data``, as fairseq-generate parses it.

    ``extra``: more fairseq flags (e.g. ``--beam 5``); the languages are inferred from the data dir
    (``{split}.{src}-{tgt}.*``) when not given, as fairseq does.
    """
    first = data.split(":")[0]
    if not os.path.isdir(first):
        raise KDConfigError("--data: not a directory: %s" % first)
    if source_lang is None or target_lang is None:
        source_lang, target_lang = data_utils.infer_language_pair(first)
        if source_lang is None:
            raise KDConfigError("--data: cannot infer the language pair from the files in %s; "
                                "pass --source-lang and --target-lang" % first)
    for lang in (source_lang, target_lang):
        dict_file = os.path.join(first, "dict.%s.txt" % lang)
        if not os.path.isfile(dict_file):
            raise KDConfigError("--data: no dictionary %s" % dict_file)
    parser = options.get_generation_parser(default_task="translation")
    argv = [data, "--task", "translation", "--source-lang", source_lang, "--target-lang", target_lang]
    args = options.parse_args_and_arch(parser, argv + [str(a) for a in extra])
    return convert_namespace_to_omegaconf(args)


def setup_task(cfg):
    """The stock ``translation`` task of a :func:`fairseq_config` config (loads the dictionaries)."""
    return tasks.setup_task(cfg.task)


def load_split(task, split):
    """Load ``split`` into ``task`` and return it, or one clear error naming the missing files."""
    try:
        task.load_dataset(split)
    except FileNotFoundError:
        raise KDConfigError("--split: no %s split in %s (expected %s.%s-%s.%s.{bin,idx})" % (
            split, task.cfg.data, split, task.cfg.source_lang, task.cfg.target_lang, task.cfg.source_lang)) from None
    return task.dataset(split)


def load_ensemble(spec, task, flag="--path", cuda=False):
    """The checkpoints in ``spec`` (``A.pt[:B.pt...]``) as eval-mode models for ``task``, and their paths
    (kd_plugin.teacher.load_members: same checks and errors as the online teacher), on GPU if ``cuda``."""
    members, paths = load_members(spec, task, flag)
    return [m.cuda() for m in members] if cuda else members, paths


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def teacher_info(paths):
    """Metadata identifying the teacher: absolute paths and sha256 of the checkpoint files."""
    return [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in paths]


def shard_range(n, num_shards, shard_id):
    """Shard ``shard_id`` of ``num_shards``: indices [floor(n I / N), floor(n (I+1) / N)) of ``n``."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


class IndexRangeDataset(BaseWrapperDataset):
    """``dataset`` batched over the indices in [lo, hi) only; sample ids stay those of the full split.

    The order is the full split's order restricted to the range, so a shard sees its sentences in the
    same relative order as an unsharded run.
    """

    def __init__(self, dataset, lo, hi):
        super().__init__(dataset)
        self.lo, self.hi = lo, hi

    def ordered_indices(self):
        indices = self.dataset.ordered_indices()
        return indices[(indices >= self.lo) & (indices < self.hi)]


def batch_iterator(task, dataset, models, index_range, max_tokens=None, batch_size=None, seed=1):
    """fairseq's batches of ``dataset`` restricted to ``index_range``, in fixed (unshuffled) order.

    Sentences too long for the models are an error (never silently skipped: the output must cover
    every index).
    """
    dataset = IndexRangeDataset(dataset, *index_range)
    max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models])
    try:
        itr = task.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
                                      max_positions=max_positions, ignore_invalid_inputs=False, seed=seed,
                                      disable_iterator_cache=True)
    except Exception as e:  # fairseq raises a bare Exception for over-long sentences
        if not str(e).startswith("Size of sample"):
            raise
        raise KDConfigError("--data: %s is longer than the max (source, target) positions %s of the "
                            "task and the teacher" % (str(e).split(" is invalid")[0], max_positions)) from None
    return itr.next_epoch_itr(shuffle=False)


class Progress:
    """Logs ``done/total sentences, sents/s`` every ``interval`` batches and a summary at the end."""

    def __init__(self, what, total, interval):
        self.what, self.total, self.interval = what, total, interval
        self.done = self.batches = 0
        self.start = time.perf_counter()

    @property
    def rate(self):
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, sentences):
        self.done += sentences
        self.batches += 1
        if self.batches % self.interval == 0:
            logger.info("%s: %d/%d sentences (%.1f%%), %.1f sents/s", self.what, self.done, self.total,
                        100.0 * self.done / max(self.total, 1), self.rate)

    def finish(self):
        elapsed = time.perf_counter() - self.start
        logger.info("%s: %d sentences in %.1f s (%.1f sents/s)", self.what, self.done, elapsed, self.rate)


CORPUS_SUFFIXES = (".json", ".txt", ".bin", ".idx")  # .idx last: it commits the dataset


def write_corpus(prefix, seqs, dictionary, dtype, meta):
    """``prefix``.bin/.idx (indexed dataset), .txt (one line per sentence) and .json (``meta``)."""
    builder = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    with open(prefix + ".txt", "w", encoding="utf-8") as txt:
        for s in seqs:
            tokens = torch.from_numpy(s.astype(np.int64))
            builder.add_item(tokens)
            txt.write(dictionary.string(tokens) + "\n")
    builder.finalize(index_file_path(prefix))
    outputs.write_json(prefix + ".json", meta)
