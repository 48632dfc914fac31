"""A language-pair dataset that also serves teacher signals stored next to the data.

Each extra source (teacher-decoded targets, the offline top-K cache) is indexed like the wrapped
dataset; items are fetched per sample and collated in the batch's own order (``sample["id"]``).
Which extras a batch carries and which target lengths batching counts follow the criterion's
kd_plugin.needs.TeacherNeeds, read through a :class:`NeedsRef` that the task fills once the criterion
exists (fairseq loads the validation split before it builds the criterion; batches are made after).
"""
import functools
import json
import os

import numpy as np
from fairseq.data import BaseWrapperDataset, FairseqDataset, data_utils

from kd_plugin.checks import KDConfigError, dictionary_checksum
from kd_plugin.needs import TEACHER, TEACHER_NET_INPUT, TEACHER_TARGET


class NeedsRef:
    """The criterion's TeacherNeeds, shared by the task and its datasets (None until the criterion exists)."""

    def __init__(self):
        self.needs = None

    def wants(self, key):
        """Whether batches carry the extra ``key`` (all extras while the needs are unknown)."""
        n = self.needs
        return n is None or (n.logits if key == TEACHER else n.targets)

    def counts_gold(self):
        return self.needs is None or self.needs.gold_targets


def teacher_targets_prefix(directory, split, src, tgt):
    return os.path.join(directory, "%s.%s-%s.%s" % (split, src, tgt, tgt))


def load_teacher_targets(directory, split, src, tgt, dictionary, expected_len, left_pad, flag="--teacher-targets"):
    """Teacher-decoded targets (kd-distill-corpus output) for ``split``, checked against the split and the
    target dictionary."""
    prefix = teacher_targets_prefix(directory, split, src, tgt)
    ds = data_utils.load_indexed_dataset(prefix, dictionary)
    if ds is None:
        raise KDConfigError("%s: no teacher-decoded %s split at %s.{bin,idx} "
                            "(make it with kd-distill-corpus --split %s)" % (flag, split, prefix, split))
    if len(ds) != expected_len:
        raise KDConfigError("%s: %s.bin holds %d sentences but the %s split has %d"
                            % (flag, prefix, len(ds), split, expected_len))
    meta_file = prefix + ".json"
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("dictionary_md5") not in (None, dictionary_checksum(dictionary)):
            raise KDConfigError("%s: %s was built with another target dictionary" % (flag, meta_file))
    return TeacherTargets(ds, dictionary, left_pad, prefix)


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


class KDLanguagePairDataset(BaseWrapperDataset):
    """Wraps a LanguagePairDataset and adds ``extras`` (objects with ``key``, ``sizes``, ``[i]`` and
    ``collate``), those the criterion needs (``needs``, a :class:`NeedsRef`)."""

    def __init__(self, dataset, extras, needs):
        super().__init__(dataset)
        self.extras, self.needs = list(extras), needs
        self._sizes = {}

    @property
    def target_sizes(self):
        """Target lengths for batching: max(gold, teacher-decoded), or the teacher-decoded alone when the
        criterion never runs the student on the gold target (sentence_kd without gold mix)."""
        key = self.needs.needs
        if key not in self._sizes:
            decoded = [e.sizes for e in self.extras if e.sizes is not None and self.needs.wants(e.key)]
            gold = self.dataset.tgt_sizes if self.dataset.tgt_sizes is not None else self.dataset.src_sizes
            lengths = decoded if decoded and not self.needs.counts_gold() else [gold] + decoded
            self._sizes[key] = functools.reduce(np.maximum, lengths)
        return self._sizes[key]

    def __getitem__(self, index):
        item = self.dataset[index]
        for extra in self.extras:
            if self.needs.wants(extra.key):
                item[extra.key] = extra[index]
        return item

    def collater(self, samples):
        sample = self.dataset.collater(samples)
        if not sample:
            return sample
        by_id = {s["id"]: s for s in samples}
        order = [by_id[i] for i in sample["id"].tolist()]
        for extra in self.extras:
            if self.needs.wants(extra.key):
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
