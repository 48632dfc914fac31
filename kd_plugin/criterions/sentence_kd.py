r"""Criterion ``sentence_kd``: label-smoothed NLL on the teacher's beam-search output (Kim & Rush, 2016).

    loss = sum_t LS-NLL(y^_t | y^_<t, x),   y^ = teacher-decoded target (sample[TEACHER_TARGET])

With --kd-gold-mix p, each training sentence uses its gold target instead with probability p
(sequence-level interpolation); p = 0 is pure sentence-level KD. Validation always uses y^.
"""
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig

from kd_plugin.criterions.base import KDCriterionBase
from kd_plugin.needs import TEACHER_NET_INPUT, TEACHER_TARGET, TeacherNeeds


@dataclass
class SentenceKDConfig(LabelSmoothedCrossEntropyCriterionConfig):
    kd_gold_mix: float = field(default=0.0, metadata={
        "help": "probability p of training a sentence on its gold target instead of the teacher's, in [0, 1]",
        "range": (0, 1)})


def pad_right(x, width, pad):
    """B x t tokens right-padded with ``pad`` to B x width."""
    return x if x.size(1) == width else torch.cat([x, x.new_full((x.size(0), width - x.size(1)), pad)], 1)


def teacher_target_sample(sample, pad, use_gold=None):
    """A shallow copy of ``sample`` whose target / prev_output_tokens are the teacher's.

    use_gold: optional B bool tensor; those sentences keep their gold target (right-padded batches).
    """
    target, prev = sample[TEACHER_TARGET], sample[TEACHER_NET_INPUT]["prev_output_tokens"]
    if use_gold is not None and bool(use_gold.any()):
        gold, gold_prev = sample["target"], sample["net_input"]["prev_output_tokens"]
        width = max(gold.size(1), target.size(1))
        pick = use_gold.unsqueeze(1)
        target = torch.where(pick, pad_right(gold, width, pad), pad_right(target, width, pad))
        prev = torch.where(pick, pad_right(gold_prev, width, pad), pad_right(prev, width, pad))
        keep = target.ne(pad).any(0)  # drop all-pad columns left by the mix
        target, prev = target[:, keep], prev[:, keep]
    out = dict(sample, target=target, net_input=dict(sample["net_input"], prev_output_tokens=prev))
    out["ntokens"] = int(target.ne(pad).sum())
    return out


@register_criterion("sentence_kd", dataclass=SentenceKDConfig)
class SentenceKDCriterion(KDCriterionBase):
    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        self.gold_mix = cfg.kd_gold_mix
        # gold targets are trained on only with --kd-gold-mix > 0 (batching counts them then)
        self.teacher_needs = TeacherNeeds(targets=True, gold_targets=cfg.kd_gold_mix > 0)

    def sentence_sample(self, sample):
        self.require(sample, TEACHER_TARGET)
        use_gold = None
        if self.training and self.gold_mix > 0:
            use_gold = torch.rand(sample["target"].size(0), device=sample["target"].device) < self.gold_mix
        return teacher_target_sample(sample, self.padding_idx, use_gold)

    def forward(self, model, sample, reduce=True):
        sample = self.sentence_sample(sample)
        return super().forward(model, sample, reduce)
