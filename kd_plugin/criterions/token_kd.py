r"""Criterion ``token_kd``: the student matches the teacher's per-token distribution.

    loss = sum_t (1 - alpha) * LS-NLL(y_t) + alpha * T^2 * D(p_T(. | y_<t, x) || q_T(. | y_<t, x)) * s_t

summed over non-pad gold target tokens (so ``sample_size`` keeps fairseq's meaning), with D from
kd_plugin.divergences, p_T / q_T the teacher / student distributions at temperature T and s_t the
selective-KD mask (1 for --kd-select all). With --kd-topk K > 0 (and with every --teacher-cache) p and q are
K+1 bins: the teacher's K ids (the student's full softmax there) and the mass outside them, tempered as
bins (kd_plugin.signals).
alpha = 0 reproduces label_smoothed_cross_entropy exactly.
"""
import math
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum

from kd_plugin.checks import KDConfigError
from kd_plugin.criterions.base import KDCriterionBase
from kd_plugin.divergences import DIVERGENCES, full_vocab_divergence, get_divergence
from kd_plugin.needs import TEACHER, TeacherNeeds
from kd_plugin.selection import GlobalCEQueue, select_batch
from kd_plugin.signals import aligned_log_probs, signal_topk


@dataclass
class TokenKDConfig(LabelSmoothedCrossEntropyCriterionConfig):
    kd_alpha: float = field(default=0.5, metadata={"help": "weight of the KD term, in [0, 1]", "range": (0, 1)})
    kd_temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature T > 0 (loss scaled by T^2)", "range": (0, math.inf), "lo_open": True})
    kd_divergence: ChoiceEnum(list(DIVERGENCES)) = field(
        default="forward_kl", metadata={"help": "divergence D(teacher || student)"})
    kd_js_beta: float = field(default=0.5, metadata={
        "help": "beta of the generalized JS divergence, in [0, 1]", "range": (0, 1)})
    kd_skew_lambda: float = field(default=0.1, metadata={
        "help": "lambda of the skew KL divergences, in [0, 1]", "range": (0, 1)})
    kd_topk: int = field(default=0, metadata={"help": (
        "KD over K+1 bins: the teacher's top-K tokens and the mass outside them, for teacher and student "
        "(student: its full softmax at the K ids); temperature tempers the bins (exact at T=1 and for K=V, "
        "an approximation of tempering the full distribution otherwise); 0 = full vocabulary")})
    kd_select: ChoiceEnum(["all", "batch", "global"]) = field(
        default="all", metadata={"help": "selective KD: tokens with the highest student CE get KD"})
    kd_select_rate: float = field(default=0.5, metadata={
        "help": "fraction r of tokens selected, in (0, 1]", "range": (0, 1), "lo_open": True})
    kd_select_queue: int = field(default=30000, metadata={
        "help": "size of the global CE queue (--kd-select global)", "range": (1, math.inf)})


@register_criterion("token_kd", dataclass=TokenKDConfig)
class TokenKDCriterion(KDCriterionBase):
    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        vocab = len(task.target_dictionary)
        if not 0 <= cfg.kd_topk <= vocab:
            raise KDConfigError("--kd-topk must be in [0, %d] (the target vocabulary); got %d" % (vocab, cfg.kd_topk))
        self.alpha, self.temperature = cfg.kd_alpha, cfg.kd_temperature
        self.divergence = get_divergence(str(cfg.kd_divergence))
        self.div_kwargs = {"js_beta": cfg.kd_js_beta, "skew_lambda": cfg.kd_skew_lambda}
        self.topk = cfg.kd_topk
        self.teacher_needs = TeacherNeeds(logits=True, topk=cfg.kd_topk)
        self.select_mode, self.select_rate, self.ce_queue = self.selection(cfg)

    @staticmethod
    def selection(cfg):
        """(mode, rate, global CE queue or None) of selective KD, from the --kd-select flags."""
        mode = str(cfg.kd_select)
        return mode, cfg.kd_select_rate, GlobalCEQueue(cfg.kd_select_queue) if mode == "global" else None

    def select(self, ce):
        """Selective-KD mask over the N target tokens, from their student cross-entropies ``ce``."""
        if self.select_mode == "batch":
            return select_batch(ce, self.select_rate)
        return self.ce_queue.select(ce, self.select_rate, update=self.training)

    def kd_per_token(self, lprobs, target, teacher):
        """B x T tensor of T^2 * D(p_T || q_T) * s_t, zero at padding, from the student's log-probs ``lprobs``
        (top-K bins need its full softmax)."""
        mask = target.ne(self.padding_idx)
        if self.ignore_prefix_size > 0:
            mask[:, : self.ignore_prefix_size] = False
        if not self.topk and not signal_topk(teacher):  # full vocabulary: chunked, lean on memory
            d = full_vocab_divergence(self.divergence, lprobs, teacher["lprobs"], mask, self.temperature,
                                      **self.div_kwargs)
        else:
            lp, lq = aligned_log_probs(teacher, lprobs, mask, self.temperature, self.topk)
            d = self.divergence(lp, lq, **self.div_kwargs)
        d = self.temperature ** 2 * d
        if self.select_mode != "all":
            ce = -lprobs.detach().gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
            d = d * self.select(ce)
        out = d.new_zeros(mask.shape)
        out[mask] = d
        return out

    def token_terms(self, model, net_output, sample, per_sentence=False):
        """(ls, nll, kd): gold LS-NLL, gold NLL and KD term, as batch sums or B-vectors of sentence sums."""
        teacher = self.require(sample, TEACHER)
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        kd = self.kd_per_token(lprobs, target, teacher)
        flat_lprobs, flat_target = self.get_lprobs_and_target(model, net_output, sample) \
            if self.ignore_prefix_size > 0 else (lprobs.view(-1, lprobs.size(-1)), target.view(-1))
        ls, nll = label_smoothed_nll_loss(flat_lprobs, flat_target, self.eps, ignore_index=self.padding_idx,
                                          reduce=not per_sentence)
        if per_sentence:
            bsz = target.size(0)
            return ls.view(bsz, -1).sum(1), nll.view(bsz, -1).sum(1), kd.sum(1)
        return ls, nll, kd.sum()

    def token_loss(self, ls, kd):
        """(1 - alpha) * LS-NLL + alpha * KD."""
        return (1.0 - self.alpha) * ls + self.alpha * kd

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        ls, nll, kd = self.token_terms(model, net_output, sample)
        loss = self.token_loss(ls, kd)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data, "nll_loss": nll.data, "kd_loss": kd.data,
            "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0), "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"], logging_output["total"] = n_correct.item(), total.item()
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        super().reduce_metrics(logging_outputs)
        cls.log_per_token("kd_loss", logging_outputs, "ntokens")

    @staticmethod
    def logging_outputs_can_be_summed():
        return True
