"""A language-pair dataset that also serves teacher signals stored next to the data.

Each extra source (teacher-decoded targets, the offline top-K cache) is indexed like the wrapped
dataset; items are fetched per sample and collated in the batch's own order (``sample["id"]``).
"""
import functools

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset, data_utils

from kd_plugin.signals import TEACHER_NET_INPUT, TEACHER_TARGET


class TeacherTargets:
    """Teacher-decoded target sentences (a fairseq indexed dataset aligned with the split)."""

    key = TEACHER_TARGET

    def __init__(self, dataset, dictionary, left_pad=False, prefix=None):
        self.dataset, self.dictionary, self.left_pad = dataset, dictionary, left_pad
        self.prefix = prefix  # {prefix}.bin/.idx on disk (a cache dumped on these targets names their md5)
        self.sizes = np.asarray(dataset.sizes)

    def __getitem__(self, index):
        return self.dataset[index]

    def collate(self, items, sample):
        pad, eos = self.dictionary.pad(), self.dictionary.eos()
        sample[TEACHER_TARGET] = data_utils.collate_tokens(items, pad, eos, self.left_pad)
        sample[TEACHER_NET_INPUT] = {
            "prev_output_tokens": data_utils.collate_tokens(
                items, pad, eos, self.left_pad, move_eos_to_beginning=True)
        }
        sample["teacher_ntokens"] = sum(len(t) for t in items)


class KDLanguagePairDataset(BaseWrapperDataset):
    """Wraps a LanguagePairDataset and adds ``extras`` (objects with ``key``, ``[i]`` and ``collate``)."""

    def __init__(self, dataset, extras, gold_targets=True):
        super().__init__(dataset)
        self.extras = list(extras)
        self.batch_by_gold(gold_targets)

    def batch_by_gold(self, gold_targets):
        """Target lengths for batching: max(gold, teacher-decoded), or the teacher-decoded alone when the
        criterion never runs the student on the gold target (sentence_kd without gold mix)."""
        decoded = [e.sizes for e in self.extras if getattr(e, "sizes", None) is not None]
        gold = self.dataset.tgt_sizes if self.dataset.tgt_sizes is not None else self.dataset.src_sizes
        lengths = decoded if decoded and not gold_targets else [gold] + decoded
        self.target_sizes = functools.reduce(np.maximum, lengths)

    def __getitem__(self, index):
        item = self.dataset[index]
        for extra in self.extras:
            item[extra.key] = extra[index]
        return item

    def collater(self, samples):
        sample = self.dataset.collater(samples)
        if not sample:
            return sample
        by_id = {s["id"]: s for s in samples}
        order = [by_id[i] for i in sample["id"].tolist()]
        for extra in self.extras:
            extra.collate([s[extra.key] for s in order], sample)
        return sample

    def ordered_indices(self):
        """fairseq's order (shuffled, then stably sorted by target and then source length), the target length
        being the one batching counts: sorting by gold lengths while batching by teacher-output lengths would
        put unequal lengths together and pad batches."""
        inner = self.dataset
        if getattr(inner, "buckets", None) is not None:
            return inner.ordered_indices()
        n = len(self)
        indices = np.random.permutation(n).astype(np.int64) if inner.shuffle else np.arange(n, dtype=np.int64)
        indices = indices[np.argsort(self.target_sizes[indices], kind="mergesort")]
        return indices[np.argsort(inner.src_sizes[indices], kind="mergesort")]

    # batching and size filtering also count the teacher-decoded target length (self.target_sizes)
    def num_tokens(self, index):
        return max(self.dataset.src_sizes[index], self.target_sizes[index])

    def num_tokens_vec(self, indices):
        return np.maximum(self.dataset.src_sizes[indices], self.target_sizes[indices])

    def size(self, index):
        return (self.dataset.src_sizes[index], self.target_sizes[index])

    batch_by_size = FairseqDataset.batch_by_size

    def filter_indices_by_size(self, indices, max_sizes):
        return data_utils.filter_paired_dataset_indices_by_size(
            self.dataset.src_sizes, self.target_sizes, indices, max_sizes)
