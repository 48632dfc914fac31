r"""Criterion ``on_policy_kd``: token-level KD on the student's own outputs for a share lambda of the sentences.

    loss = sum_{b gold} [(1 - alpha) LS-NLL_b + alpha KD_b]  +  sum_{b on-policy} KD_b
    KD_b = sum_t T^2 D(p_T(. | y_<t, x) || q_T(. | y_<t, x))

For a share lambda (--on-policy-share) of the training sentences, y is the student's own output, decoded
without gradient (greedy at --on-policy-temperature 0, sampled otherwise; kd_plugin.on_policy); for the
others it is the gold target, exactly as in token_kd. The online teacher scores every position of either
prefix (a cache cannot: it holds gold prefixes only), with token_kd's divergences, temperature and top-K.
On-policy rows have no gold term: their targets are the student's own tokens. Generalized KD (Agarwal et al.,
ICLR 2024) with the share lambda per sentence instead of per batch; ImitKD (Lin et al., 2020) for NMT.
Validation always uses the gold prefixes (its loss is token_kd's); lambda = 0 is token_kd exactly.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion

from kd_plugin.checks import KDConfigError
from kd_plugin.criterions.token_kd import KDTermConfig, TokenKDCriterion
from kd_plugin.needs import ON_POLICY, OnPolicy, TeacherNeeds


@dataclass
class OnPolicyKDConfig(KDTermConfig):
    on_policy_share: float = field(default=0.5, metadata={"help": (
        "lambda: share of training sentences (chosen per sentence and update) whose prefix is the student's own "
        "output, in [0, 1]"), "range": (0, 1)})
    on_policy_temperature: float = field(default=1.0, metadata={"help": (
        "the student's decoding of its prefixes: 0 = greedy, > 0 = sampling at this temperature"),
        "range": (0, math.inf)})
    on_policy_max_len_a: float = field(default=1.2, metadata={"help": (
        "length cap of the student's prefixes: a * source length + b (as fairseq-generate's --max-len-a)"),
        "range": (0, math.inf)})
    on_policy_max_len_b: int = field(default=10, metadata={
        "help": "b of the length cap (--max-len-b)", "range": (1, math.inf)})


@register_criterion("on_policy_kd", dataclass=OnPolicyKDConfig)
class OnPolicyKDCriterion(TokenKDCriterion):
    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        if cfg.ignore_prefix_size > 0:
            raise KDConfigError("--criterion on_policy_kd does not take --ignore-prefix-size (the student's own "
                                "outputs carry no prefix tokens)")
        self.teacher_needs = TeacherNeeds(logits=True, topk=self.topk, on_policy=OnPolicy(
            cfg.on_policy_share, cfg.on_policy_temperature, cfg.on_policy_max_len_a, cfg.on_policy_max_len_b))

    @staticmethod
    def selection(cfg):
        """No selective KD (the config, a KDTermConfig, has no --kd-select): every token gets the KD term."""
        return "all", None, None

    def forward(self, model, sample, reduce=True):
        rows = sample.get(ON_POLICY)
        if rows is None or not rows.any():  # validation, or no sentence drawn: token_kd
            return super().forward(model, sample, reduce)
        net_output = model(**sample["net_input"])
        ls, nll, kd = self.token_terms(model, net_output, sample, per_sentence=True)
        loss = torch.where(rows, kd, self.token_loss(ls, kd)).sum()
        gold = ~rows
        target = sample["target"]
        sample_size = target.size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data, "nll_loss": nll[gold].sum().data, "kd_loss": kd.sum().data,
            "ntokens": sample["ntokens"], "nsentences": target.size(0), "sample_size": sample_size,
            "gold_ntokens": int(target[gold].ne(self.padding_idx).sum()), "on_policy_sentences": int(rows.sum()),
        }
        if self.report_accuracy:  # gold rows only
            n_correct, total = self.compute_accuracy(model, net_output, dict(sample, target=target.masked_fill(
                rows.unsqueeze(1), self.padding_idx)))
            logging_output["n_correct"], logging_output["total"] = n_correct.item(), total.item()
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        """token_kd's metrics, with nll_loss (and ppl) per gold-row token: on-policy rows have no gold NLL, so
        with no gold row at all (share 1) only the loss is logged, not 0 / 0."""
        gold = [dict(log, ntokens=log.get("gold_ntokens", log.get("ntokens", 0))) for log in logging_outputs]
        if sum(log["ntokens"] for log in gold) > 0:
            super(TokenKDCriterion, cls).reduce_metrics(gold)
        else:
            cls.log_per_token("loss", logging_outputs, "sample_size")
        cls.log_per_token("kd_loss", logging_outputs, "ntokens")
        on_policy = sum(log.get("on_policy_sentences", 0) for log in logging_outputs)
        sentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        if on_policy and sentences:
            from fairseq import metrics

            metrics.log_scalar("on_policy_share", on_policy / sentences, sentences, round=3)
