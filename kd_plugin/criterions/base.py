"""What every kd-plugin criterion shares: construction from its config, its declared needs, checked access to
the teacher signals, metric helpers.

A criterion is built from ``(task, cfg)``, ``cfg`` its registered dataclass (fairseq fills a parameter named
``cfg`` with it). The defaults live in the dataclass only; a field whose metadata has ``"range": (lo, hi)``
must lie in [lo, hi], or in (lo, hi] with ``"lo_open": True``, checked here for every criterion at once.
Each subclass sets ``self.teacher_needs`` (kd_plugin.needs.TeacherNeeds) in its constructor and reads what
the task tells it from ``self.facts`` (kd_plugin.needs.TaskFacts).
"""
import dataclasses
import math

from fairseq import metrics
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from kd_plugin.checks import KDConfigError
from kd_plugin.needs import TEACHER, TEACHER_TARGET, task_facts

_WHERE = {
    TEACHER: "teacher logits: use --task translation_kd with --teacher-path (online) or --teacher-cache",
    TEACHER_TARGET: "teacher-decoded targets: use --task translation_kd with --teacher-targets DIR",
}


def check_range(flag, value, lo, hi, lo_open=False):
    """``value`` of ``flag`` must lie in [lo, hi] (or (lo, hi] when lo_open)."""
    if not lo <= value <= hi or (lo_open and value == lo):  # also refuses NaN
        raise KDConfigError("%s must be in %s%s, %s]; got %s" % (flag, "(" if lo_open else "[", lo, hi, value))


def check_ranges(cfg, config_class):
    """Every field of ``config_class`` that declares a range: its value in ``cfg`` must lie in it."""
    for f in dataclasses.fields(config_class):
        if "range" in f.metadata:
            check_range("--" + f.name.replace("_", "-"), getattr(cfg, f.name), *f.metadata["range"],
                        lo_open=f.metadata.get("lo_open", False))


class KDCriterionBase(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus access to the teacher's signals in the sample."""

    def __init__(self, task, cfg):
        facts = task_facts(task, self.registered_name())  # first: another task's error names the task
        super().__init__(task, sentence_avg=cfg.sentence_avg, label_smoothing=cfg.label_smoothing,
                         ignore_prefix_size=cfg.ignore_prefix_size, report_accuracy=cfg.report_accuracy)
        self.facts = facts
        check_ranges(cfg, getattr(type(self), "__dataclass"))  # the dataclass register_criterion gave the class

    @classmethod
    def registered_name(cls):
        """The --criterion name of this class."""
        from fairseq.criterions import CRITERION_REGISTRY

        return next((k for k, v in CRITERION_REGISTRY.items() if v is cls), cls.__name__)

    def require(self, sample, key):
        if key not in sample:
            raise KDConfigError("criterion %s needs %s" % (self.__class__.__name__, _WHERE[key]))
        return sample[key]

    @staticmethod
    def log_per_token(name, logging_outputs, count_key):
        """Log sum(name) / sum(count_key) in base 2, the way fairseq logs its losses."""
        total = sum(log.get(name, 0) for log in logging_outputs)
        count = sum(log.get(count_key, 0) for log in logging_outputs)
        if count > 0:
            metrics.log_scalar(name, total / count / math.log(2), count, round=3)
