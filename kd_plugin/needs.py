"""The contract between the task ``translation_kd`` and a kd-plugin criterion: all that passes between them.

Criterion to task. Every KD criterion sets ``self.teacher_needs`` (a :class:`TeacherNeeds`) in its
constructor. The task reads it once, in ``build_criterion``, and from then on:

- refuses a command line that cannot serve it (no ``--teacher-path`` / ``--teacher-cache`` for ``logits``,
  no ``--teacher-targets`` for ``targets``, a cache with fewer than ``topk`` entries);
- loads the online teacher only when ``logits`` are needed and no cache serves them;
- batches by the target lengths the loss really runs on (``gold_targets``: the gold targets count, else
  only the teacher-decoded ones);
- puts into every sample exactly the needed keys, named below: ``sample[TEACHER]`` for ``logits``
  (top-``topk`` form when ``topk`` > 0; kd_plugin.signals describes both forms), ``sample[TEACHER_TARGET]``
  and ``sample[TEACHER_NET_INPUT]`` for ``targets``.

Task to criterion. A task serves KD criteria when it has a method ``kd_task_facts()`` returning a
:class:`TaskFacts`; a criterion reads it once, in its constructor, through :func:`task_facts`, which refuses
any other task.

Nothing else passes between task and criterion.
"""
from dataclasses import dataclass
from typing import Optional

from kd_plugin.checks import KDConfigError

# the sample keys the task fills for the criterion (besides fairseq's own: id, net_input, target, ntokens)
TEACHER = "teacher"  # the teacher's token-level signal, aligned with sample["target"] (kd_plugin.signals)
TEACHER_TARGET = "teacher_target"  # B x T' teacher-decoded targets
TEACHER_NET_INPUT = "teacher_net_input"  # {"prev_output_tokens": B x T'} of the teacher-decoded targets


@dataclass(frozen=True)
class TeacherNeeds:
    logits: bool = False  # the teacher's token-level signal on the batch's prefixes (sample[TEACHER])
    targets: bool = False  # the teacher-decoded targets (sample[TEACHER_TARGET], sample[TEACHER_NET_INPUT])
    topk: int = 0  # K of the token-level signal; 0 = the full vocabulary (online teacher only)
    gold_targets: bool = True  # the loss runs the student on the gold targets (batching counts their length)


@dataclass(frozen=True)
class TaskFacts:
    # the encoder output dimension of the student the task built (fairseq-train builds the model before the
    # criterion; hybrid_kd's learned gate reads it); None when the task has built no model
    student_dim: Optional[int]
    left_pad_target: bool  # targets (gold, teacher-decoded) are left-padded


def task_facts(task, criterion_name):
    """``task.kd_task_facts()``; KDConfigError when ``task`` serves no teacher signals."""
    if not hasattr(task, "kd_task_facts"):
        task_name = getattr(getattr(task, "cfg", None), "_name", None) or type(task).__name__
        raise KDConfigError("--criterion %s needs --task translation_kd (the task that serves the teacher's "
                            "signals); got --task %s" % (criterion_name, task_name))
    return task.kd_task_facts()
