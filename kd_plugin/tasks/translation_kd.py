"""Task ``translation_kd``: fairseq's translation task plus the teacher's signals in every sample.

Signals (documented keys, see kd_plugin.signals):
  sample["teacher"]            token-level teacher log-probs on the gold prefix: online from
                               ``--teacher-path`` (run in train_step/valid_step) or read from ``--teacher-cache``;
  sample["teacher_target"]     teacher-decoded targets from ``--teacher-targets`` (kd-distill-corpus output),
  sample["teacher_net_input"]  with their ``prev_output_tokens``.
A criterion declares what it needs in ``teacher_signals`` ({"logits", "targets"}) and the top-K it wants
in ``teacher_topk``; the task checks this at start-up and only runs the teacher when it is needed.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn
from fairseq import utils
from fairseq.data import data_utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from kd_plugin.checks import KDConfigError, dictionary_checksum
from kd_plugin.data.kd_dataset import KDLanguagePairDataset, TeacherTargets
from kd_plugin.signals import TEACHER
from kd_plugin.teacher import Teacher

logger = logging.getLogger(__name__)


@dataclass
class TranslationKDConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None, metadata={"help": "teacher checkpoint(s) run online, colon-separated for an ensemble "
                                        "(probabilities averaged)"})
    teacher_targets: Optional[str] = field(
        default=None, metadata={"help": "directory of teacher-decoded targets written by kd-distill-corpus "
                                        "({split}.{src}-{tgt}.{tgt}.bin/idx); defaults to --teacher-cache "
                                        "when that directory holds them"})
    teacher_cache: Optional[str] = field(
        default=None, metadata={"help": "directory of cached top-K teacher log-probs written by "
                                        "kd-dump-teacher (no teacher is loaded)"})


def unwrap_criterion(criterion):
    """The criterion itself under fairseq's distributed wrappers: ModuleProxyWrapper(DDP(criterion))."""
    while isinstance(getattr(criterion, "module", None), nn.Module):
        criterion = criterion.module
    return criterion


def teacher_targets_prefix(directory, split, src, tgt):
    return os.path.join(directory, "%s.%s-%s.%s" % (split, src, tgt, tgt))


def load_teacher_targets(directory, split, src, tgt, dictionary, expected_len, left_pad):
    """Teacher-decoded targets for ``split``, checked against the split and the target dictionary."""
    prefix = teacher_targets_prefix(directory, split, src, tgt)
    ds = data_utils.load_indexed_dataset(prefix, dictionary)
    if ds is None:
        raise KDConfigError("--teacher-targets: no teacher-decoded %s split at %s.{bin,idx} "
                            "(make it with kd-distill-corpus --split %s)" % (split, prefix, split))
    if len(ds) != expected_len:
        raise KDConfigError("--teacher-targets: %s.bin holds %d sentences but the %s split has %d"
                            % (prefix, len(ds), split, expected_len))
    meta_file = prefix + ".json"
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("dictionary_md5") not in (None, dictionary_checksum(dictionary)):
            raise KDConfigError("--teacher-targets: %s was built with another target dictionary" % meta_file)
    return TeacherTargets(ds, dictionary, left_pad)


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask):
    cfg: TranslationKDConfig
    serves_teacher_signals = True  # the KD criterions refuse any other task at construction

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        for flag in ("--teacher-targets", "--teacher-cache"):
            self.teacher_dirs(flag)  # refuse a teacher directory list that does not match DATA at start-up
        self.teacher = None
        self.student_dim = None
        self.gold_targets = True  # set by build_criterion: does the criterion train on gold targets?

    def teacher_dirs(self, flag):
        """The directories given to ``flag`` (colon-separated), one per data directory: fairseq trains epoch e
        on data directory (e-1) mod n (``DATA=a:b``), so teacher signals must follow the same rotation."""
        value = getattr(self.cfg, flag.lstrip("-").replace("-", "_"))
        if not value:
            return []
        dirs, n = utils.split_paths(value), len(utils.split_paths(self.cfg.data))
        if len(dirs) != n:
            raise KDConfigError(
                "%s: %d director%s for %d data director%s; with DATA=a:b fairseq trains epoch e on data "
                "directory (e-1) mod n, so give one teacher directory per data directory, colon-separated, "
                "in the same order" % (flag, len(dirs), "y" if len(dirs) == 1 else "ies", n,
                                       "y" if n == 1 else "ies"))
        return dirs

    def targets_dir(self, epoch=1):
        """--teacher-targets, or the cache directory when it also holds teacher-decoded targets, for ``epoch``."""
        dirs = self.teacher_dirs("--teacher-targets") or self.teacher_dirs("--teacher-cache")
        if not dirs:
            return None
        chosen = dirs[(epoch - 1) % len(dirs)]
        if self.cfg.teacher_targets:
            return chosen
        probe = teacher_targets_prefix(chosen, self.cfg.train_subset, self.cfg.source_lang,
                                       self.cfg.target_lang) + ".idx"
        return chosen if os.path.isfile(probe) else None

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        extras = []
        targets_dir = self.targets_dir(epoch)
        if targets_dir:
            extras.append(load_teacher_targets(
                targets_dir, split, self.cfg.source_lang, self.cfg.target_lang,
                self.tgt_dict, len(self.datasets[split]), self.cfg.left_pad_target))
        caches = self.teacher_dirs("--teacher-cache")
        if caches:
            from kd_plugin.data.teacher_cache import load_teacher_cache

            extras.append(load_teacher_cache(caches[(epoch - 1) % len(caches)], split, self.datasets[split],
                                             self.tgt_dict))
        if extras:
            self.datasets[split] = KDLanguagePairDataset(self.datasets[split], extras, self.gold_targets)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.student_dim = getattr(cfg, "encoder_embed_dim", None)
        return model

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        needs = set(getattr(criterion, "teacher_signals", ()))
        name = getattr(cfg, "_name", type(criterion).__name__)
        if "logits" in needs and not (self.cfg.teacher_path or self.cfg.teacher_cache):
            raise KDConfigError("criterion %s needs teacher logits: pass --teacher-path (online teacher) or "
                                "--teacher-cache (made by kd-dump-teacher)" % name)
        if "targets" in needs and not self.targets_dir():
            raise KDConfigError("criterion %s needs teacher-decoded targets: pass --teacher-targets DIR "
                                "(made by kd-distill-corpus)" % name)
        if "logits" in needs and self.cfg.teacher_cache:
            from kd_plugin.data.teacher_cache import check_cache_topk

            for cache in self.teacher_dirs("--teacher-cache"):
                check_cache_topk(cache, getattr(criterion, "teacher_topk", 0))
        if "logits" in needs and not self.cfg.teacher_cache and self.teacher is None:
            self.teacher = Teacher.load(self.cfg.teacher_path, self)
        # batch by the targets the loss really runs on (datasets loaded before, e.g. valid, are updated)
        self.gold_targets = getattr(criterion, "gold_targets", True)
        for dataset in self.datasets.values():
            if isinstance(dataset, KDLanguagePairDataset):
                dataset.batch_by_gold(self.gold_targets)
        return criterion

    def add_teacher_signal(self, sample, model, criterion):
        """Run the online teacher on the batch if the criterion needs its logits."""
        criterion = unwrap_criterion(criterion)
        if (self.teacher is None or not sample or TEACHER in sample
                or "logits" not in getattr(criterion, "teacher_signals", ())):
            return
        sample[TEACHER] = self.teacher.signal(sample["net_input"], model,
                                              topk=getattr(criterion, "teacher_topk", 0))

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.add_teacher_signal(sample, model, criterion)
        inner = unwrap_criterion(criterion)
        if hasattr(inner, "set_num_updates"):
            inner.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.add_teacher_signal(sample, model, criterion)
        return super().valid_step(sample, model, criterion)
