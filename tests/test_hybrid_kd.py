"""hybrid_kd: gate ends equal token_kd / sentence_kd, the gate learns, is checkpointed, and does not collapse."""
import re

import pytest
import torch
import torch.nn.functional as F

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


def _capture(module, store, key):
    """Keep ``module``'s last output in ``store[key]`` (a forward hook)."""
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))


def test_gate_gradient_is_its_bce_alone_and_mix_gives_none(data_bin, teacher, teacher_targets):
    """The gate's parameters get exactly the gradient of lambda_g * BCE(sigmoid(z), t) * sample_size / B (the
    BCE per sentence once fairseq divides by sample_size), nothing from the mix; with lambda_g = 0, none at all.
    The gate's input is detached: its BCE does not reach the student."""
    _, task, model, hybrid = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "sentence")
    sample = first_batch(task)
    bsz = sample["target"].size(0)
    seen = {}
    _capture(hybrid.gate, seen, "logits")
    _capture(hybrid.benefit, seen, "target")
    params = [p for _, p in sorted(hybrid.gate.named_parameters())]
    # a gate that is not 1/2 everywhere, so the mix's d/dg = L_token - L_sentence would reach it
    torch.nn.init.normal_(hybrid.gate.out.weight, std=0.5)
    torch.manual_seed(0)  # same dropout masks in both passes
    loss, size, _ = criterion_loss(task, model, hybrid, sample, train=True)
    got = torch.autograd.grad(loss, params, retain_graph=True)
    z, t = seen["logits"].double(), seen["target"].double()
    assert t.std() > 0.05 and z.std() > 0.01
    bce = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).sum()
    want = torch.autograd.grad(bce * size / bsz, params, retain_graph=True)
    for g, w in zip(got, want):  # float32 loss vs float64 reference: tolerance relative to the largest entry
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4 * w.abs().max().item())
    assert want[-1].abs().sum() > 0  # the output layer learns
    loss.backward()
    enc_grad = model.encoder.embed_tokens.weight.grad.clone()

    model.zero_grad()
    hybrid.gate_weight = 0.0
    torch.manual_seed(0)
    loss, _, _ = criterion_loss(task, model, hybrid, sample, train=True)
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in got)
    loss.backward()
    torch.testing.assert_close(model.encoder.embed_tokens.weight.grad, enc_grad, rtol=1e-5, atol=1e-7)


def test_benefit_target_is_scale_free():
    """Multiplying one loss by 1000 (other units) leaves the gate's target unchanged."""
    d_tok, d_sent = torch.rand(64) + 0.1, torch.rand(64) + 0.1
    a, b = BenefitTarget(), BenefitTarget()
    assert torch.allclose(a(d_tok, d_sent), b(1000 * d_tok, d_sent), atol=1e-6)
    t = a(d_tok, d_sent)
    assert 0.35 < t.mean() < 0.65 and t.std() > 0.02


def test_benefit_target_running_means_and_one_sentence_by_hand():
    """float64 hand computation: E[.] starts at the first batch mean, then E <- m E + (1 - m) mean(batch);
    t = sigmoid((r - mean r) / (std r + 1e-6) / tau), r = d_sent / E[d_sent] - d_tok / E[d_tok], std unbiased;
    update=False leaves the means alone; a single sentence gets t = 1/2 (and still updates the means)."""
    tau, momentum = 0.5, 0.9
    target = BenefitTarget(tau, momentum)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(n, generator=g) * s + 0.1, torch.rand(n, generator=g) + 0.2)
               for n, s in ((6, 1.0), (5, 3.0), (7, 0.5))]
    e_tok = e_sent = None

    def step(e, x):
        return x.double().mean() if e is None else momentum * e + (1 - momentum) * x.double().mean()

    for i, (d_tok, d_sent) in enumerate(batches + [batches[0]]):
        update = i < 3
        got = target(d_tok, d_sent, update=update)
        if update:
            e_tok, e_sent = step(e_tok, d_tok), step(e_sent, d_sent)
        r = d_sent.double() / e_sent - d_tok.double() / e_tok
        want = torch.sigmoid((r - r.mean()) / (r.std() + 1e-6) / tau)
        assert target.mean_tok.item() == pytest.approx(e_tok.item(), rel=1e-6)
        assert target.mean_sent.item() == pytest.approx(e_sent.item(), rel=1e-6)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert e_tok.item() != pytest.approx(batches[2][0].double().mean().item(), rel=1e-2)  # momentum mattered

    for update in (False, True):
        got = target(torch.tensor([0.7]), torch.tensor([2.0]), update=update)
        assert got.tolist() == [0.5]
    e_tok, e_sent = momentum * e_tok + (1 - momentum) * 0.7, momentum * e_sent + (1 - momentum) * 2.0
    assert target.mean_tok.item() == pytest.approx(e_tok.item(), rel=1e-6)
    assert target.mean_sent.item() == pytest.approx(e_sent.item(), rel=1e-6)


def _fixed_loss(data_bin, teacher, teacher_targets, model, sample, value, *extra):
    """The loss of hybrid_kd with the gate fixed at ``value``, on ``model`` and ``sample``, eval mode."""
    _, task, _, crit = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "fixed:%r" % value,
                              "--dropout", "0", *extra)
    return criterion_loss(task, model, crit, sample)


def test_learned_gate_mixes_with_sigmoid_of_its_logit(data_bin, teacher, teacher_targets):
    """--kd-gate sentence with a constant output (weights 0, bias 1.2): every sentence is mixed with
    g = sigmoid(1.2), and with --kd-gate-weight 0 the loss is fixed:g's (the same sample size)."""
    _, task, model, hybrid = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "sentence",
                                    "--dropout", "0")
    hybrid.gate.out.bias.data.fill_(1.2)
    g = torch.sigmoid(torch.tensor(1.2, dtype=torch.float64)).item()
    sample = first_batch(task)
    bsz = sample["target"].size(0)
    hybrid.gate_weight = 0.0
    loss, size, log = criterion_loss(task, model, hybrid, sample, train=True)
    assert log["gate"] == pytest.approx(g * bsz) and log["gate_sq"] == pytest.approx(g * g * bsz)
    ref, ref_size, _ = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, g)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and size == pytest.approx(ref_size)


@pytest.mark.parametrize("gate", ["fixed:0.3", "sentence"])
def test_sentence_avg_sample_size_is_the_number_of_sentences(data_bin, teacher, teacher_targets, gate):
    """--sentence-avg: sample_size = B (not the gate-weighted token count); a fixed-gate loss is unchanged."""
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", gate,
                                  "--dropout", "0", "--sentence-avg")
    _, _, _, tokens = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", gate, "--dropout", "0")
    sample = first_batch(task)
    bsz = sample["target"].size(0)
    loss, size, _ = criterion_loss(task, model, crit, sample)
    ref, ref_size, _ = criterion_loss(task, model, tokens, sample)
    assert size == bsz and ref_size > 2 * bsz
    if gate.startswith("fixed"):
        pad = task.target_dictionary.pad()
        n_gold, n_teacher = sample["target"].ne(pad).sum().item(), sample["teacher_target"].ne(pad).sum().item()
        assert ref_size == pytest.approx(0.3 * n_gold + 0.7 * n_teacher)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def _gate_stats(log):
    rows = [(float(m.group(1)), float(m.group(2))) for m in
            re.finditer(r"train_inner .*?gate=([\d.]+), gate_std=([\d.]+)", log)]
    assert rows, log[-2000:]
    return rows


def test_hybrid_trains_gate_is_checkpointed_and_does_not_collapse(data_bin, teacher, teacher_targets, tmp_path):
    save = str(tmp_path / "h")
    common = ["--criterion", "hybrid_kd", "--kd-gate", "sentence", "--teacher-path", teacher, "--teacher-targets",
              teacher_targets, "--label-smoothing", "0.1"]
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
