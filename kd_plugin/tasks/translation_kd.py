"""Task ``translation_kd``: fairseq's translation task plus the teacher's signals in every sample.

Signals (the keys of kd_plugin.needs, the forms of kd_plugin.signals):
  sample["teacher"]            token-level teacher log-probs on the batch's prefixes: online from
                               ``--teacher-path`` (run in train_step/valid_step) or read from ``--teacher-cache``;
  sample["teacher_target"]     teacher-decoded targets from ``--teacher-targets`` (kd-distill-corpus output),
  sample["teacher_net_input"]  with their ``prev_output_tokens``.
The criterion declares what it needs in ``criterion.teacher_needs`` (kd_plugin.needs.TeacherNeeds); the task
reads it once in ``build_criterion``, checks the command line against it, and serves exactly that. In return
the criterion reads ``kd_task_facts()`` (kd_plugin.needs.TaskFacts) once, when it is built.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from kd_plugin.checks import KDConfigError
from kd_plugin.data.kd_dataset import KDLanguagePairDataset, NeedsRef, load_teacher_targets, teacher_targets_prefix
from kd_plugin.needs import TEACHER, TaskFacts, TeacherNeeds
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
    # no flag (an interpolation): kept so that checkpoints saved while it seeded on_policy_kd (retired,
    # kd_plugin.retired) still load, fairseq refusing a saved task configuration with a key it does not know
    # (tests/test_retired.py)
    seed: int = II("common.seed")


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(TranslationTask):
    cfg: TranslationKDConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        for flag in ("--teacher-targets", "--teacher-cache"):
            self.teacher_dirs(flag)  # refuse a teacher directory list that does not match DATA at start-up
        self.teacher = None
        self._student_dim = None  # the encoder output dimension of the model built last (kd_task_facts)
        self.needs = NeedsRef()  # the criterion's TeacherNeeds, once build_criterion has read it

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
        """fairseq's split plus every teacher signal given for it (batches carry those the criterion needs)."""
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
            self.datasets[split] = KDLanguagePairDataset(self.datasets[split], extras, self.needs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self._student_dim = getattr(cfg, "encoder_embed_dim", None)
        return model

    def kd_task_facts(self):
        """What a KD criterion reads from this task (kd_plugin.needs), once, when it is built."""
        return TaskFacts(student_dim=self._student_dim, left_pad_target=bool(self.cfg.left_pad_target))

    def build_criterion(self, cfg):
        """Build the criterion, read its TeacherNeeds once and check that this command line can serve them."""
        criterion = super().build_criterion(cfg)
        needs = getattr(criterion, "teacher_needs", None)
        name = getattr(cfg, "_name", type(criterion).__name__)
        if needs is None:  # a stock criterion (e.g. label_smoothed_cross_entropy): no teacher signal
            needs = TeacherNeeds()
        if needs.logits and not (self.cfg.teacher_path or self.cfg.teacher_cache):
            raise KDConfigError("criterion %s needs teacher logits: pass --teacher-path (online teacher) or "
                                "--teacher-cache (made by kd-dump-teacher)" % name)
        if needs.targets and not self.targets_dir():
            raise KDConfigError("criterion %s needs teacher-decoded targets: pass --teacher-targets DIR "
                                "(made by kd-distill-corpus)" % name)
        if needs.logits and self.cfg.teacher_cache:
            from kd_plugin.data.teacher_cache import check_cache_topk

            for cache in self.teacher_dirs("--teacher-cache"):
                check_cache_topk(cache, needs.topk)
        elif needs.logits and self.teacher is None:
            self.teacher = Teacher.load(self.cfg.teacher_path, self)
        self.needs.needs = needs
        return criterion

    def add_teacher_signal(self, sample, model):
        """Run the online teacher on the batch's gold prefixes if the criterion needs its logits."""
        needs = self.needs.needs
        if self.teacher is None or not sample or needs is None or not needs.logits or TEACHER in sample:
            return
        sample[TEACHER] = self.teacher.signal(sample["net_input"], model, topk=needs.topk)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self.add_teacher_signal(sample, model)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        self.add_teacher_signal(sample, model)
        return super().valid_step(sample, model, criterion)
