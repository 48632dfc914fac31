"""Task ``translation_kd``: fairseq's translation task plus the teacher's signals in every sample.

Signals (documented keys, see kd_plugin.signals):
  sample["teacher"]            token-level teacher log-probs on the gold prefix: online from
                               ``--teacher-path`` (run in train_step/valid_step) or read from ``--teacher-cache``;
  sample["teacher_target"]     teacher-decoded targets from ``--teacher-targets`` (kd-distill-corpus output),
  sample["teacher_net_input"]  with their ``prev_output_tokens``;
  sample["teacher_on_targets"] token-level teacher log-probs on its own decoded targets (aligned with
                               sample["teacher_target"]): online, the teacher run on src + teacher_net_input, or
                               read from a --teacher-cache dumped with kd-dump-teacher --targets.
A criterion declares what it needs in ``teacher_signals`` ({"logits", "logits_on_targets", "targets"}) and
the top-K it wants in ``teacher_topk``; the task checks this at start-up and only runs the teacher when it is
needed.
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
from kd_plugin.signals import TEACHER, TEACHER_NET_INPUT, TEACHER_ON_TARGETS, TEACHER_TARGET
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


def load_teacher_targets(directory, split, src, tgt, dictionary, expected_len, left_pad, flag="--teacher-targets"):
    """Teacher-decoded targets for ``split``, checked against the split and the target dictionary."""
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
        self.criterion_needs = None  # set by build_criterion: its teacher_signals

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
            from kd_plugin.data.teacher_cache import has_cache, load_teacher_cache, load_teacher_cache_on_targets

            # the store(s) the criterion reads (both present ones before it is built, e.g. for valid); the
            # gold-prefix store is required unless the directory only holds one on the teacher's targets
            cache, needs = caches[(epoch - 1) % len(caches)], self.criterion_needs
            on_targets = None
            if needs is None or "logits_on_targets" in needs:
                on_targets = load_teacher_cache_on_targets(cache, split, extras[0] if targets_dir else None,
                                                           self.tgt_dict)
            if on_targets is None or (has_cache(cache, split) and (needs is None or "logits" in needs)):
                extras.append(load_teacher_cache(cache, split, self.datasets[split], self.tgt_dict))
            if on_targets is not None:
                extras.append(on_targets)
        if extras:
            self.datasets[split] = KDLanguagePairDataset(self.datasets[split], extras, self.gold_targets)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.student_dim = getattr(cfg, "encoder_embed_dim", None)
        return model

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        needs = set(getattr(criterion, "teacher_signals", ()))
        self.criterion_needs = needs
        name = getattr(cfg, "_name", type(criterion).__name__)
        if "logits" in needs and not (self.cfg.teacher_path or self.cfg.teacher_cache):
            raise KDConfigError("criterion %s needs teacher logits: pass --teacher-path (online teacher) or "
                                "--teacher-cache (made by kd-dump-teacher)" % name)
        if "logits_on_targets" in needs and not (self.cfg.teacher_path or self.cfg.teacher_cache):
            raise KDConfigError("criterion %s needs the teacher on its decoded targets: pass --teacher-path "
                                "(online teacher) or --teacher-cache made by kd-dump-teacher --targets" % name)
        if "targets" in needs and not self.targets_dir():
            raise KDConfigError("criterion %s needs teacher-decoded targets: pass --teacher-targets DIR "
                                "(made by kd-distill-corpus)" % name)
        if "logits" in needs and self.cfg.teacher_cache:
            from kd_plugin.data.teacher_cache import check_cache_topk

            for cache in self.teacher_dirs("--teacher-cache"):
                check_cache_topk(cache, getattr(criterion, "teacher_topk", 0))
        if "logits_on_targets" in needs and self.cfg.teacher_cache:
            from kd_plugin.data.teacher_cache import check_cache_topk, require_cache_on_targets

            splits = {self.cfg.train_subset} | set(self.datasets)  # valid is loaded before the criterion
            for cache in self.teacher_dirs("--teacher-cache"):
                for split in sorted(splits):
                    require_cache_on_targets(cache, split, name)
                check_cache_topk(cache, getattr(criterion, "teacher_topk", 0), on_targets=True)
        if needs & {"logits", "logits_on_targets"} and not self.cfg.teacher_cache and self.teacher is None:
            self.teacher = Teacher.load(self.cfg.teacher_path, self)
        # batch by the targets the loss really runs on (datasets loaded before, e.g. valid, are updated)
        self.gold_targets = getattr(criterion, "gold_targets", True)
        for dataset in self.datasets.values():
            if isinstance(dataset, KDLanguagePairDataset):
                dataset.batch_by_gold(self.gold_targets)
        return criterion

    def add_teacher_signal(self, sample, model, criterion):
        """Run the online teacher on the batch if the criterion needs its logits: on the gold prefixes
        ("logits") and / or on the teacher-decoded ones ("logits_on_targets")."""
        criterion = unwrap_criterion(criterion)
        if self.teacher is None or not sample:
            return
        needs, topk = getattr(criterion, "teacher_signals", ()), getattr(criterion, "teacher_topk", 0)
        if "logits" in needs and TEACHER not in sample:
            sample[TEACHER] = self.teacher.signal(sample["net_input"], model, topk=topk)
        if "logits_on_targets" in needs and TEACHER_ON_TARGETS not in sample and TEACHER_TARGET in sample:
            net_input = dict(sample["net_input"], prev_output_tokens=sample[TEACHER_NET_INPUT]["prev_output_tokens"])
            sample[TEACHER_ON_TARGETS] = self.teacher.signal(net_input, model, topk=topk)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.add_teacher_signal(sample, model, criterion)
        inner = unwrap_criterion(criterion)
        if hasattr(inner, "set_num_updates"):
            inner.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.add_teacher_signal(sample, model, criterion)
        return super().valid_step(sample, model, criterion)
