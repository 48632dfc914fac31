r"""Criterion ``hybrid_kd``: token- and sentence-level KD mixed per source sentence by a weight g(x).

    loss = sum_x g(x) L_token(x) + (1 - g(x)) L_sentence(x) + w * LS-NLL_gold(x) [+ lambda_g * GateBCE]

g defaults to a fixed 1/2 (--kd-gate fixed:0.5): on the demo corpus, 3 seeds, no learned gate or global
controller beat the best fixed weight and 0.5 and 0.75 were indistinguishable (docs/MIX.md); learned gates
(sentence, scalar, global, sentence+global) and sample:<v> are options.

L_token(x) is token_kd's loss on x (same flags: --kd-alpha, --kd-temperature, --kd-divergence, --kd-topk,
selective KD), L_sentence(x) sentence_kd's (LS-NLL on the teacher-decoded target), w = --kd-gold-weight.
The student runs ONCE, through the (possibly DDP-wrapped) model's own forward, on a 2B batch: the sources
twice, the gold prefixes in the first half and the teacher's in the second (right-padded to one width).
Calling ``model.encoder`` / ``model.decoder`` instead would bypass DistributedDataParallel.forward, and the
gradients would never be all-reduced. The gate reads the encoder states through a forward hook. Cost: the
encoder runs on 2B sentences instead of B. See kd_plugin.gate for why g(x) is detached in the mix and
trained on a benefit signal instead (the anti-collapse design).
``sample_size`` is the gate-weighted token count sum_x g n_gold(x) + (1 - g) n_teacher(x), so fixed:1
equals token_kd and fixed:0 equals sentence_kd.

--kd-mix gate (the default) is the mix above. Every other --kd-mix is a rule of kd_plugin.mixing: ONE student
pass (through ``model(...)``) on the teacher-decoded target y^ only, with per-token weights w_t,

    loss = sum_x sum_t (1 - w_t) LS-NLL(y^_t) + w_t T^2 D(p_T(. | y^_<t, x) || q_T(. | y^_<t, x))

p from the teacher run on its own prefixes (sample["teacher_on_targets"]); sample_size = the teacher-target
token count, so w = 0 equals sentence_kd and w = 1 is pure word-KD on the teacher's prefix. No gate, no
criterion parameters: the checkpoint decodes with stock fairseq-generate. The --kd-gate* flags and
--kd-gold-weight belong to the gate (a rule refuses --kd-gold-weight > 0); the token_kd flags (--kd-alpha,
--kd-temperature, --kd-divergence, --kd-topk, selective KD) keep their meaning on the teacher's prefix.
"""
from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import ChoiceEnum

from kd_plugin.checks import KDConfigError
from kd_plugin.criterions.base import check_range
from kd_plugin.criterions.sentence_kd import pad_right, teacher_target_sample
from kd_plugin.criterions.token_kd import TokenKDConfig, TokenKDCriterion
from kd_plugin.gate import BenefitTarget, FixedGate, SampledGate, build_gate, gate_loss, uses_global
from kd_plugin.mixing import MIX_RULES, get_rule
from kd_plugin.signals import TEACHER_ON_TARGETS, TEACHER_TARGET


def row_estimate(values, keep, counts):
    """Per-sentence sums ``values`` of the rows with keep = 1, rescaled so that their total estimates the
    whole batch's: values * keep * sum(counts) / sum(keep * counts) (zeros when no row is kept)."""
    kept = (keep * counts).sum()
    return values.detach() * keep * (counts.sum() / kept if kept > 0 else 0.0)


@dataclass
class HybridKDConfig(TokenKDConfig):
    kd_gate: str = field(default="fixed:0.5", metadata={
        "help": "gate g(x): sentence (from the student's encoder output), scalar, fixed:<value>, global (a "
                "logit b moved by the losses' learning progress, kd_plugin.gate), sentence+global, or "
                "sample:<value> (training: each sentence on ONE prefix, token with probability value: a B-row "
                "pass, the same expected loss as fixed:<value>)"})
    kd_gold_weight: float = field(default=0.0, metadata={"help": "weight w of an extra gold LS-NLL term"})
    kd_gate_tau: float = field(default=1.0, metadata={"help": "temperature of the gate's benefit target"})
    kd_gate_weight: float = field(default=1.0, metadata={"help": "weight of the gate's BCE loss"})
    kd_gate_warmup: int = field(default=0, metadata={"help": "updates during which the mix uses g = 1/2"})
    kd_gate_momentum: float = field(default=0.99, metadata={"help": "momentum of the losses' running means"})
    kd_gate_hidden: int = field(default=64, metadata={"help": "hidden units of the sentence gate"})
    kd_gate_global_rate: float = field(default=0.02, metadata={
        "help": "--kd-gate global: step of b per unit of learning-progress difference, per batch (>= 0)"})
    kd_gate_global_bound: float = field(default=2.0, metadata={"help": "--kd-gate global: |b| <= this (> 0)"})
    kd_mix: ChoiceEnum(["gate"] + list(MIX_RULES)) = field(default="gate", metadata={"help": (
        "gate: the two-prefix mix by --kd-gate; word (w = --kd-alpha), confidence, entropy, hkd, curriculum: "
        "one pass on the teacher-decoded target, (1 - w_t) LS-NLL + w_t KD per token (kd_plugin.mixing); "
        "needs the teacher on its own targets (--teacher-path, or a cache from kd-dump-teacher --targets)")})
    kd_mix_start: float = field(default=0.0, metadata={"help": "--kd-mix curriculum: KD weight at update 0, in [0, 1]"})
    kd_mix_end: float = field(default=1.0, metadata={
        "help": "--kd-mix curriculum: KD weight after the ramp, in [0, 1]"})
    kd_mix_ramp: int = field(default=1000, metadata={
        "help": "--kd-mix curriculum: updates of the linear ramp from start to end (>= 0)"})


@register_criterion("hybrid_kd", dataclass=HybridKDConfig)
class HybridKDCriterion(TokenKDCriterion):
    teacher_signals = ("logits", "targets")

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 kd_alpha=0.5, kd_temperature=1.0, kd_divergence="forward_kl", kd_js_beta=0.5,
                 kd_skew_lambda=0.1, kd_topk=0, kd_select="all", kd_select_rate=0.5, kd_select_queue=30000,
                 kd_gate="fixed:0.5", kd_gold_weight=0.0, kd_gate_tau=1.0, kd_gate_weight=1.0,
                 kd_gate_warmup=0, kd_gate_momentum=0.99, kd_gate_hidden=64, kd_gate_global_rate=0.02,
                 kd_gate_global_bound=2.0, kd_mix="gate", kd_mix_start=0.0, kd_mix_end=1.0, kd_mix_ramp=1000):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy, kd_alpha,
                         kd_temperature, kd_divergence, kd_js_beta, kd_skew_lambda, kd_topk, kd_select,
                         kd_select_rate, kd_select_queue)
        if ignore_prefix_size:
            raise KDConfigError("hybrid_kd does not support --ignore-prefix-size")
        if getattr(getattr(task, "cfg", None), "left_pad_target", False):
            raise KDConfigError("hybrid_kd needs right-padded targets: drop --left-pad-target")
        check_range("--kd-gold-weight", kd_gold_weight, 0, float("inf"))
        check_range("--kd-gate-tau", kd_gate_tau, 0, float("inf"), lo_open=True)
        check_range("--kd-gate-momentum", kd_gate_momentum, 0, 1)
        check_range("--kd-gate-weight", kd_gate_weight, 0, float("inf"))
        check_range("--kd-gate-warmup", kd_gate_warmup, 0, float("inf"))
        check_range("--kd-gate-hidden", kd_gate_hidden, 1, float("inf"))
        check_range("--kd-gate-global-rate", kd_gate_global_rate, 0, float("inf"))
        check_range("--kd-gate-global-bound", kd_gate_global_bound, 0, float("inf"), lo_open=True)
        self.num_updates = 0
        self.mix = str(kd_mix)
        if self.mix != "gate":
            self.init_rule(kd_gold_weight, kd_mix_start, kd_mix_end, kd_mix_ramp)
            return
        try:
            self.gate = build_gate(kd_gate, getattr(task, "student_dim", None), kd_gate_hidden)
        except ValueError as e:
            raise KDConfigError(str(e)) from None
        self.use_global = uses_global(kd_gate)
        if isinstance(self.gate, SampledGate) and self.select_mode != "all":
            raise KDConfigError("--kd-gate sample:<v> needs --kd-select all (selection ranks the whole batch)")
        if isinstance(self.gate, SampledGate) and kd_gold_weight:
            raise KDConfigError("--kd-gate sample:<v> cannot add --kd-gold-weight (a sentence runs one prefix)")
        self.benefit = BenefitTarget(kd_gate_tau, kd_gate_momentum,
                                     kd_gate_global_rate if self.use_global else None, kd_gate_global_bound)
        self.gold_weight, self.gate_weight, self.gate_warmup = kd_gold_weight, kd_gate_weight, kd_gate_warmup

    def init_rule(self, gold_weight, start, end, ramp):
        """A kd_plugin.mixing rule: the student runs on the teacher's prefix only, with its signal there."""
        if gold_weight:
            raise KDConfigError("--kd-gold-weight needs --kd-mix gate (the rules never run the gold target)")
        check_range("--kd-mix-start", start, 0, 1)
        check_range("--kd-mix-end", end, 0, 1)
        check_range("--kd-mix-ramp", ramp, 0, float("inf"))
        self.rule = get_rule(self.mix)
        self.rule_args = {"alpha": self.alpha, "start": start, "end": end, "ramp": ramp}
        self.teacher_signals = ("logits_on_targets", "targets")
        self.gold_targets = False  # batching counts the teacher-decoded lengths only
        self.gate = self.benefit = None
        self.use_global = False

    def set_num_updates(self, num_updates):
        self.num_updates = num_updates

    def mix_weights(self, logits, bsz, device):
        """g used in the mix (detached): fixed value, 1/2 during warm-up, else sigmoid(z(x) [+ b])."""
        if isinstance(self.gate, FixedGate) and not self.use_global:
            return torch.full((bsz,), self.gate.value, device=device)
        if self.training and self.num_updates < self.gate_warmup:
            return torch.full((bsz,), 0.5, device=device)
        z = torch.zeros(bsz, device=device) if logits is None else logits.detach().float()
        return torch.sigmoid(z + self.benefit.global_logit.float() if self.use_global else z)

    def student_pass(self, model, sample, sent, rows=None):
        """One forward of ``model`` on the gold and the teacher prefixes stacked into a 2B batch, or, with
        ``rows`` (B bools, ``sample:<v>``), a B batch where sentence i has the gold prefix if rows[i] else the
        teacher's (the other half's outputs are then those same rows: only the chosen prefix's terms count).

        Returns the net outputs of the gold half and of the teacher half (logits cut back to each target's
        width), and the encoder states and padding mask of the gold half (read by a hook on the encoder)."""
        net_input, bsz = sample["net_input"], sample["target"].size(0)
        gold_prev, sent_prev = net_input["prev_output_tokens"], sent["net_input"]["prev_output_tokens"]
        width = max(gold_prev.size(1), sent_prev.size(1))
        gold_prev_w, sent_prev_w = (pad_right(x, width, self.padding_idx) for x in (gold_prev, sent_prev))
        copies = 2 if rows is None else 1
        captured = []
        hook = model.encoder.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            logits, extra = model(
                src_tokens=torch.cat([net_input["src_tokens"]] * copies),
                src_lengths=torch.cat([net_input["src_lengths"]] * copies),
                prev_output_tokens=torch.cat([gold_prev_w, sent_prev_w]) if rows is None
                else torch.where(rows.unsqueeze(1), gold_prev_w, sent_prev_w))
        finally:
            hook.remove()
        enc = captured[-1]
        mask = enc["encoder_padding_mask"][0][:bsz] if enc["encoder_padding_mask"] else None
        second = logits[bsz:] if rows is None else logits
        return ((logits[:bsz, :gold_prev.size(1)], extra), (second[:, :sent_prev.size(1)], extra),
                enc["encoder_out"][0][:, :bsz], mask)

    def draw(self, bsz, device):
        """``sample:<v>``: per sentence, True (gold prefix, token-level terms) with probability v. fairseq's
        Trainer reseeds torch before every update, so the draws are reproducible and survive a resume."""
        return torch.rand(bsz, device=device) < self.gate.value

    def rule_forward(self, model, sample):
        """loss = sum_t (1 - w_t) LS-NLL(y^_t) + w_t KD_t on the teacher prefix, w from the --kd-mix rule."""
        self.require(sample, TEACHER_TARGET)
        if TEACHER_ON_TARGETS not in sample:
            raise KDConfigError("hybrid_kd --kd-mix %s needs the teacher on its decoded targets: use --task "
                                "translation_kd with --teacher-path, or a --teacher-cache made by kd-dump-teacher "
                                "--targets DISTILL" % self.mix)
        teacher, sent = sample[TEACHER_ON_TARGETS], teacher_target_sample(sample, self.padding_idx)
        net_output = model(**sent["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target, bsz = sent["target"], sent["target"].size(0)
        kd = self.kd_per_token(lprobs, target, teacher)
        ls, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1), self.eps,
                                          ignore_index=self.padding_idx, reduce=False)
        ls, nll = ls.view(bsz, -1), nll.view(bsz, -1)
        w = self.rule(mask=target.ne(self.padding_idx), teacher=teacher, target=target,
                      student_lprob=-nll.detach(), vocab_size=lprobs.size(-1), num_updates=self.num_updates,
                      **self.rule_args)
        loss = ((1 - w) * ls + w * kd).sum()
        sample_size = float(bsz) if self.sentence_avg else sent["ntokens"]
        logging_output = {
            "loss": loss.data, "nll_loss": nll.sum().data, "kd_loss": kd.sum().data, "ntokens": sent["ntokens"],
            "nsentences": bsz, "sample_size": sample_size, "mix_weight": w.sum().item(),
        }
        return loss, sample_size, logging_output

    def forward(self, model, sample, reduce=True):
        if self.mix != "gate":
            return self.rule_forward(model, sample)
        self.require(sample, TEACHER_TARGET)
        sent = teacher_target_sample(sample, self.padding_idx)
        bsz = sent["target"].size(0)
        rows = self.draw(bsz, sent["target"].device) if self.training and isinstance(self.gate, SampledGate) else None
        out_tok, out_sent, enc_states, padding_mask = self.student_pass(model, sample, sent, rows)
        gold_ls, tok_nll, tok_kd = self.token_terms(model, out_tok, sample, per_sentence=True)
        tok_loss = self.token_loss(gold_ls, tok_kd)
        sent_loss, sent_nll = label_smoothed_nll_loss(
            model.get_normalized_probs(out_sent, log_probs=True).view(-1, out_sent[0].size(-1)),
            sent["target"].view(-1), self.eps, ignore_index=self.padding_idx, reduce=False)
        sent_loss, sent_nll = sent_loss.view(bsz, -1).sum(1), sent_nll.view(bsz, -1).sum(1)

        n_gold = sample["target"].ne(self.padding_idx).sum(1).to(tok_kd)
        n_teacher = sent["target"].ne(self.padding_idx).sum(1).to(tok_kd)
        logits = self.gate(enc_states, padding_mask)
        target = None
        if logits is not None or self.use_global:  # the benefit statistics (and the controller's b) move
            target = self.benefit(tok_kd / n_gold.clamp(min=1), sent_nll.detach() / n_teacher.clamp(min=1),
                                  update=self.training)
        g = self.mix_weights(logits, bsz, tok_kd.device) if rows is None else rows.to(tok_kd)
        loss = (g * tok_loss + (1 - g) * sent_loss).sum()
        if self.gold_weight > 0:
            loss = loss + self.gold_weight * gold_ls.sum()

        if self.sentence_avg:
            sample_size = float(bsz)
        else:
            sample_size = float((g * n_gold + (1 - g) * n_teacher).sum())
        if rows is not None:  # sample:<v>: each half's terms count on its own rows only, scaled to the batch
            tok_nll, tok_kd = (row_estimate(x, g, n_gold) for x in (tok_nll, tok_kd))
            sent_nll = row_estimate(sent_nll, 1 - g, n_teacher)
        logging_output = {
            "loss": loss.data, "nll_loss": tok_nll.sum().data, "kd_loss": tok_kd.sum().data,
            "sent_nll_loss": sent_nll.sum().data, "ntokens": sample["ntokens"],
            "teacher_ntokens": sent["ntokens"], "nsentences": bsz, "sample_size": sample_size,
            "gate": g.sum().item(), "gate_sq": (g * g).sum().item(),
        }
        if self.use_global:
            logging_output["gate_global"] = self.benefit.global_logit.item() * bsz
        if logits is not None:
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
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        if ntokens > 0 and any("mix_weight" in log for log in logging_outputs):  # mean w_t of a --kd-mix rule
            metrics.log_scalar("mix_weight", sum(log.get("mix_weight", 0) for log in logging_outputs) / ntokens,
                               ntokens, round=3)
        n = sum(log.get("nsentences", 0) for log in logging_outputs)
        if n > 0 and any("gate_global" in log for log in logging_outputs):  # the controller's b
            metrics.log_scalar("gate_global", sum(log.get("gate_global", 0) for log in logging_outputs) / n, n,
                               round=3)
        for name in ("gate", "gate_target"):
            if n > 0 and any(name in log for log in logging_outputs):
                mean = sum(log.get(name, 0) for log in logging_outputs) / n
                sq = sum(log.get(name + "_sq", 0) for log in logging_outputs) / n
                metrics.log_scalar(name, mean, n, round=3)
                metrics.log_scalar(name + "_std", max(sq - mean * mean, 0.0) ** 0.5, n, round=3)
