"""hybrid_kd: gate ends equal token_kd / sentence_kd, the gate learns, is checkpointed, and does not collapse."""
import re

import pytest
import torch

from helpers import kd_train, load_state, run
from inproc import build, criterion_loss, first_batch
from kd_plugin.gate import BenefitTarget


def _build(data_bin, teacher, teacher_targets, criterion, *extra):
    return build(data_bin, "--task", "translation_kd", "--criterion", criterion, "--teacher-path", teacher,
                 "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", *extra)


@pytest.mark.parametrize("value,other", [("1", "token_kd"), ("0", "sentence_kd")])
def test_fixed_gate_ends_equal_token_and_sentence_kd(data_bin, teacher, teacher_targets, value, other):
    _, task, model, hybrid = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "fixed:" + value)
    _, _, _, ref = _build(data_bin, teacher, teacher_targets, other)
    sample = first_batch(task)
    loss, size, log = criterion_loss(task, model, hybrid, sample)
    ref_loss, ref_size, _ = criterion_loss(task, model, ref, sample)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert size == pytest.approx(ref_size)
    assert log["gate"] == pytest.approx(float(value) * sample["target"].size(0))


def test_gate_receives_gradients_and_mix_does_not(data_bin, teacher, teacher_targets):
    _, task, model, hybrid = _build(data_bin, teacher, teacher_targets, "hybrid_kd")
    sample = first_batch(task)
    hybrid.benefit.mean_tok.fill_(1.0)
    hybrid.benefit.mean_sent.fill_(1.0)
    torch.manual_seed(0)  # same dropout masks in both passes
    loss, _, _ = criterion_loss(task, model, hybrid, sample, train=True)
    loss.backward()
    grads = {n: p.grad for n, p in hybrid.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    assert grads["gate.out.weight"].abs().sum() > 0
    # the gate's input is detached: its BCE does not reach the student's encoder
    enc_grad = model.encoder.embed_tokens.weight.grad.clone()
    model.zero_grad()
    hybrid.gate_weight = 0.0
    torch.manual_seed(0)
    loss, _, _ = criterion_loss(task, model, hybrid, sample, train=True)
    loss.backward()
    assert torch.allclose(enc_grad, model.encoder.embed_tokens.weight.grad, atol=1e-6)


def test_benefit_target_is_scale_free():
    """Multiplying one loss by 1000 (other units) leaves the gate's target unchanged."""
    d_tok, d_sent = torch.rand(64) + 0.1, torch.rand(64) + 0.1
    a, b = BenefitTarget(), BenefitTarget()
    assert torch.allclose(a(d_tok, d_sent), b(1000 * d_tok, d_sent), atol=1e-6)
    t = a(d_tok, d_sent)
    assert 0.35 < t.mean() < 0.65 and t.std() > 0.02


def _gate_stats(log):
    rows = [(float(m.group(1)), float(m.group(2))) for m in
            re.finditer(r"train_inner .*?gate=([\d.]+), gate_std=([\d.]+)", log)]
    assert rows, log[-2000:]
    return rows


def test_hybrid_trains_gate_is_checkpointed_and_does_not_collapse(data_bin, teacher, teacher_targets, tmp_path):
    save = str(tmp_path / "h")
    common = ["--criterion", "hybrid_kd", "--teacher-path", teacher, "--teacher-targets", teacher_targets,
              "--label-smoothing", "0.1"]
    log = kd_train(data_bin, save, *common, max_update=150)
    # no collapse: the mean gate stays inside (0.15, 0.85) and it varies across sentences to the end
    for mean, std in _gate_stats(log)[-5:]:
        assert 0.15 < mean < 0.85 and std > 0.008, (mean, std)  # measured: ~0.50, 0.016-0.024
    state = load_state(save + "/checkpoint_last.pt")
    gate = {k: v for k, v in state["criterion"].items() if k.startswith("gate.")}
    assert gate["gate.out.weight"].abs().sum() > 0  # moved from its zero initialization
    assert not any(k.startswith("teacher") for k in state["model"])

    # resume (default and --reset-optimizer) restores the gate: one more update at lr ~0 keeps it
    for extra in ([], ["--reset-optimizer"]):
        kd_train(data_bin, save, *common, "--lr", "1e-12", *extra, max_update=151 if not extra else 1)
        again = load_state(save + "/checkpoint_last.pt")["criterion"]
        for k, v in gate.items():
            assert torch.allclose(again[k], v, atol=1e-6), k

    out = run("fairseq-generate", data_bin, "--path", save + "/checkpoint_last.pt", "--gen-subset", "valid",
              "--beam", "2", "--batch-size", "64")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100

    # the gate dump: one row per sentence, real gate values, complexity columns, a plot
    tsv, png = str(tmp_path / "gate.tsv"), str(tmp_path / "gate.png")
    out = run("kd-gate-dump", "--data", data_bin, "--path", save + "/checkpoint_last.pt", "--split", "valid",
              "--out", tsv, "--plot", png, "--teacher-path", teacher)
    lines = open(tsv).read().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), r.split("\t"))) for r in lines[1:]]
    assert header[:4] == ["id", "gate", "src_len", "tgt_len"] and "disagreement" in header
    assert [int(r["id"]) for r in rows] == list(range(100))
    gates = torch.tensor([float(r["gate"]) for r in rows])
    assert 0 < gates.min() < gates.max() < 1 and gates.std() > 0.005
    assert "spearman(gate, src_len)" in out and open(png, "rb").read(4) == b"\x89PNG"
