r"""Criterion ``hybrid_kd``: token- and sentence-level KD mixed per source sentence by a weight g(x).

    loss = sum_x g(x) L_token(x) + (1 - g(x)) L_sentence(x)   [+ lambda_g * GateBCE, learned gate only]

L_token(x) is token_kd's loss on x with the gold prefix (same flags: --kd-alpha, --kd-temperature,
--kd-divergence, --kd-topk, selective KD), L_sentence(x) sentence_kd's (LS-NLL on the teacher-decoded target).
g is ``--kd-gate fixed:<w>`` (default 0.5: on the demo corpus, 3 seeds, no learned or adaptive weight beat the
best fixed one, docs/MIX.md) or ``--kd-gate sentence``, the paper's mechanism: a small network on the
student's encoder states, trained on a benefit signal (kd_plugin.gate explains why it is detached in the mix).
The student runs ONCE, through the (possibly DDP-wrapped) model's own forward, on a 2B batch: the sources
twice, the gold prefixes in the first half and the teacher's in the second (right-padded to one width).
Calling ``model.encoder`` / ``model.decoder`` instead would bypass DistributedDataParallel.forward, and the
gradients would never be all-reduced. The gate reads the encoder states through a forward hook. Cost: the
encoder runs on 2B sentences instead of B.
``sample_size`` is the gate-weighted token count sum_x g n_gold(x) + (1 - g) n_teacher(x), so fixed:1
equals token_kd and fixed:0 equals sentence_kd.
"""
import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from kd_plugin.checks import KDConfigError
from kd_plugin.criterions.sentence_kd import pad_right, teacher_target_sample
from kd_plugin.criterions.token_kd import TokenKDConfig, TokenKDCriterion
from kd_plugin.gate import BenefitTarget, FixedGate, build_gate, gate_loss
from kd_plugin.needs import TEACHER_TARGET, TeacherNeeds


@dataclass
class HybridKDConfig(TokenKDConfig):
    kd_gate: str = field(default="fixed:0.5", metadata={
        "help": "g(x): fixed:<w> (w in [0, 1]; 1 = token_kd, 0 = sentence_kd) or sentence (learned from the "
                "student's encoder output, trained on the benefit target of kd_plugin.gate)"})
    kd_gate_tau: float = field(default=1.0, metadata={
        "help": "--kd-gate sentence: temperature of the benefit target", "range": (0, math.inf), "lo_open": True})
    kd_gate_weight: float = field(default=1.0, metadata={
        "help": "--kd-gate sentence: weight of the gate's BCE loss", "range": (0, math.inf)})
    kd_gate_momentum: float = field(default=0.99, metadata={
        "help": "--kd-gate sentence: momentum of the two losses' running means", "range": (0, 1)})
    kd_gate_hidden: int = field(default=64, metadata={
        "help": "--kd-gate sentence: hidden units of the gate", "range": (1, math.inf)})


@register_criterion("hybrid_kd", dataclass=HybridKDConfig)
class HybridKDCriterion(TokenKDCriterion):

    def __init__(self, task, cfg):
        super().__init__(task, cfg)
        if cfg.ignore_prefix_size:
            raise KDConfigError("hybrid_kd does not support --ignore-prefix-size")
        if self.facts.left_pad_target:
            raise KDConfigError("hybrid_kd needs right-padded targets: drop --left-pad-target")
        try:
            self.gate = build_gate(cfg.kd_gate, self.facts.student_dim, cfg.kd_gate_hidden)
        except ValueError as e:
            raise KDConfigError(str(e)) from None
        self.learned = not isinstance(self.gate, FixedGate)
        self.benefit = BenefitTarget(cfg.kd_gate_tau, cfg.kd_gate_momentum) if self.learned else None
        self.gate_weight = cfg.kd_gate_weight
        self.teacher_needs = TeacherNeeds(logits=True, targets=True, topk=cfg.kd_topk, gold_targets=True)

    def student_pass(self, model, sample, sent):
        """One forward of ``model`` on the gold and the teacher prefixes stacked into a 2B batch.

        Returns the net outputs of the gold half and of the teacher half (logits cut back to each target's
        width), and the encoder states and padding mask of the gold half (read by a hook on the encoder)."""
        net_input, bsz = sample["net_input"], sample["target"].size(0)
        gold_prev, sent_prev = net_input["prev_output_tokens"], sent["net_input"]["prev_output_tokens"]
        width = max(gold_prev.size(1), sent_prev.size(1))
        captured = []
        hook = model.encoder.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            logits, extra = model(
                src_tokens=torch.cat([net_input["src_tokens"]] * 2),
                src_lengths=torch.cat([net_input["src_lengths"]] * 2),
                prev_output_tokens=torch.cat([pad_right(x, width, self.padding_idx) for x in (gold_prev, sent_prev)]))
        finally:
            hook.remove()
        enc = captured[-1]
        mask = enc["encoder_padding_mask"][0][:bsz] if enc["encoder_padding_mask"] else None
        return ((logits[:bsz, :gold_prev.size(1)], extra), (logits[bsz:, :sent_prev.size(1)], extra),
                enc["encoder_out"][0][:, :bsz], mask)

    def forward(self, model, sample, reduce=True):
        self.require(sample, TEACHER_TARGET)
        sent = teacher_target_sample(sample, self.padding_idx)
        bsz = sent["target"].size(0)
        out_tok, out_sent, enc_states, padding_mask = self.student_pass(model, sample, sent)
        gold_ls, tok_nll, tok_kd = self.token_terms(model, out_tok, sample, per_sentence=True)
        tok_loss = self.token_loss(gold_ls, tok_kd)
        sent_loss, sent_nll = label_smoothed_nll_loss(
            model.get_normalized_probs(out_sent, log_probs=True).view(-1, out_sent[0].size(-1)),
            sent["target"].view(-1), self.eps, ignore_index=self.padding_idx, reduce=False)
        sent_loss, sent_nll = sent_loss.view(bsz, -1).sum(1), sent_nll.view(bsz, -1).sum(1)

        n_gold = sample["target"].ne(self.padding_idx).sum(1).to(tok_kd)
        n_teacher = sent["target"].ne(self.padding_idx).sum(1).to(tok_kd)
        logits = self.gate(enc_states, padding_mask)
        g = torch.full((bsz,), self.gate.value, device=tok_kd.device) if logits is None \
            else torch.sigmoid(logits.detach().float())
        loss = (g * tok_loss + (1 - g) * sent_loss).sum()
        sample_size = float(bsz) if self.sentence_avg else float((g * n_gold + (1 - g) * n_teacher).sum())
        logging_output = {
            "loss": loss.data, "nll_loss": tok_nll.sum().data, "kd_loss": tok_kd.sum().data,
            "sent_nll_loss": sent_nll.sum().data, "ntokens": sample["ntokens"],
            "teacher_ntokens": sent["ntokens"], "nsentences": bsz, "sample_size": sample_size,
            "gate": g.sum().item(), "gate_sq": (g * g).sum().item(),
        }
        if logits is not None:  # the learned gate: its BCE to the benefit target (kd_plugin.gate)
            target = self.benefit(tok_kd / n_gold.clamp(min=1), sent_nll.detach() / n_teacher.clamp(min=1),
                                  update=self.training)
            aux = gate_loss(logits.float(), target)
            loss = loss + self.gate_weight * aux * (sample_size / bsz)
            logging_output["gate_loss"] = aux.data
            logging_output["gate_target"] = target.sum().item()
            logging_output["gate_target_sq"] = (target * target).sum().item()
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        super().reduce_metrics(logging_outputs)
        cls.log_per_token("sent_nll_loss", logging_outputs, "teacher_ntokens")
        n = sum(log.get("nsentences", 0) for log in logging_outputs)
        for name in ("gate", "gate_target"):
            if n > 0 and any(name in log for log in logging_outputs):
                mean = sum(log.get(name, 0) for log in logging_outputs) / n
                sq = sum(log.get(name + "_sq", 0) for log in logging_outputs) / n
                metrics.log_scalar(name, mean, n, round=3)
                metrics.log_scalar(name + "_std", max(sq - mean * mean, 0.0) ** 0.5, n, round=3)
