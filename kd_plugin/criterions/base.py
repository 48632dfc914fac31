"""What every kd-plugin criterion shares: its declared needs, checked access to the teacher signals, metric
helpers. Each subclass sets ``self.teacher_needs`` (kd_plugin.needs.TeacherNeeds) in its constructor."""
import math

from fairseq import metrics
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from kd_plugin.checks import KDConfigError

_WHERE = {
    "teacher": "teacher logits: use --task translation_kd with --teacher-path (online) or --teacher-cache",
    "teacher_target": "teacher-decoded targets: use --task translation_kd with --teacher-targets DIR",
}


def check_range(flag, value, lo, hi, lo_open=False):
    """``value`` of ``flag`` must lie in [lo, hi] (or (lo, hi] when lo_open)."""
    if not lo <= value <= hi or (lo_open and value == lo):  # also refuses NaN
        raise KDConfigError("%s must be in %s%s, %s]; got %s" % (flag, "(" if lo_open else "[", lo, hi, value))


class KDCriterionBase(LabelSmoothedCrossEntropyCriterion):
    """Label-smoothed cross-entropy plus access to the teacher's signals in the sample."""

    def __init__(self, task, *args, **kwargs):
        from fairseq.tasks import TASK_REGISTRY

        if not isinstance(task, TASK_REGISTRY.get("translation_kd", ())):  # the task serves the teacher signals
            from fairseq.criterions import CRITERION_REGISTRY

            name = next((k for k, v in CRITERION_REGISTRY.items() if v is type(self)), type(self).__name__)
            task_name = getattr(getattr(task, "cfg", None), "_name", None) or type(task).__name__
            raise KDConfigError("--criterion %s needs --task translation_kd (the task that serves the teacher's "
                                "signals); got --task %s" % (name, task_name))
        super().__init__(task, *args, **kwargs)

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
