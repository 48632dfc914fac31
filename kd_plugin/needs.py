"""What a kd-plugin criterion needs from the task: one declared object, read once.

Every KD criterion sets ``self.teacher_needs`` (a :class:`TeacherNeeds`) in its constructor. The task
``translation_kd`` reads it once, in ``build_criterion``, and from then on:

- refuses a command line that cannot serve it (no ``--teacher-path`` / ``--teacher-cache`` for ``logits``,
  no ``--teacher-targets`` for ``targets``, a cache with fewer than ``topk`` entries);
- loads the online teacher only when ``logits`` are needed and no cache serves them;
- batches by the target lengths the loss really runs on (``gold_targets``: the gold targets count, else
  only the teacher-decoded ones);
- puts into every sample exactly the needed keys (kd_plugin.signals): ``sample["teacher"]`` for
  ``logits`` (top-``topk`` form when ``topk`` > 0), ``sample["teacher_target"]`` and
  ``sample["teacher_net_input"]`` for ``targets``;
- with ``on_policy``, replaces the gold prefixes of a share of every training batch by the student's own
  outputs before the teacher scores the batch (kd_plugin.on_policy; ``sample["on_policy"]`` marks those
  rows), and refuses a ``--teacher-cache`` (it holds the teacher on the gold prefixes only).

Nothing else passes between task and criterion.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class OnPolicy:
    share: float  # lambda: the expected share of training sentences that take the student's prefix
    temperature: float  # 0: greedy; > 0: sampling at this temperature
    max_len_a: float  # length cap a * |x| + b, as fairseq-generate's
    max_len_b: int


@dataclass(frozen=True)
class TeacherNeeds:
    logits: bool = False  # the teacher's token-level signal on the batch's prefixes (sample["teacher"])
    targets: bool = False  # the teacher-decoded targets (sample["teacher_target"], sample["teacher_net_input"])
    topk: int = 0  # K of the token-level signal; 0 = the full vocabulary (online teacher only)
    gold_targets: bool = True  # the loss runs the student on the gold targets (batching counts their length)
    on_policy: Optional[OnPolicy] = None  # the student's own prefixes for a share of the training sentences
