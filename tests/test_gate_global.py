"""hybrid_kd --kd-gate global / sentence+global: the learning-progress controller of the global logit b
(float64 reference), how b enters the mix, and a real training run where b moves, stays bounded and is
checkpointed while the student decodes with stock fairseq-generate."""
import math
import re

import pytest
import torch

from helpers import kd_train, load_state, run
from inproc import criterion_loss, first_batch
from kd_plugin.gate import BenefitTarget, progress_step
from test_hybrid_kd import _build, _fixed_loss


def test_progress_controller_by_hand():
    """float64: fast/slow running means start at the first batch mean, then E <- m E + (1 - m) mean(batch)
    (m = momentum, 0.999); b <- clip(b + eta (log(S_tok/E_tok) - log(S_sent/E_sent)), +-B) after each training
    batch; the signal whose loss falls faster pulls b its way (token: up, sentence: down); update=False
    leaves b alone; B clips."""
    eta, bound, momentum = 0.5, 0.3, 0.5
    ctrl = BenefitTarget(momentum=momentum, global_rate=eta, global_bound=bound)
    fast, slow, b = [None, None], [None, None], 0.0

    def ema(e, x, m):
        return x if e is None else m * e + (1 - m) * x

    # token loss falls 3x faster than the sentence loss for 6 batches, then the sentence loss falls alone
    means = [(2.0 * 0.7 ** i, 1.0 * 0.9 ** i) for i in range(6)] + [(2.0 * 0.7 ** 5, 0.5 * 0.5 ** i) for i in range(10)]
    g = torch.Generator().manual_seed(0)
    seen = []
    for tok, sent in means:
        noise = torch.rand(5, generator=g, dtype=torch.float64) * 0.1
        d_tok, d_sent = tok + noise - noise.mean(), sent + noise - noise.mean()  # batch means exactly tok, sent
        ctrl(d_tok.float(), d_sent.float())
        for k, x in enumerate((d_tok.float().double().mean().item(), d_sent.float().double().mean().item())):
            fast[k], slow[k] = ema(fast[k], x, momentum), ema(slow[k], x, BenefitTarget.SLOW_MOMENTUM)
        b = min(bound, max(-bound, b + eta * (math.log(slow[0] / fast[0]) - math.log(slow[1] / fast[1]))))
        assert ctrl.global_logit.item() == pytest.approx(b, rel=1e-5, abs=1e-6)
        seen.append(b)
    assert seen[:4] == sorted(seen[:4]) and max(seen) == pytest.approx(bound)  # token progress: up, to the clip
    assert seen[-1] == pytest.approx(-bound) and seen.index(max(seen)) < 6  # sentence progress: down, to -B
    before = ctrl.global_logit.item()
    ctrl(torch.rand(4), torch.rand(4) * 9, update=False)
    assert ctrl.global_logit.item() == before
    # the pure step, and no slow means / b without the controller (older checkpoints keep loading)
    one = torch.tensor(1.0, dtype=torch.float64)
    assert progress_step(one * 0.1, (one, one), (one * math.e, one), 0.2, 5.0).item() == pytest.approx(0.3)
    assert set(dict(BenefitTarget().named_buffers())) == {"mean_tok", "mean_sent"}


@pytest.mark.parametrize("spec", ["global", "sentence+global"])
def test_global_logit_enters_the_mix(data_bin, teacher, teacher_targets, spec):
    """g(x) = sigmoid(z(x) + b): with b = 0.8 (and, for sentence+global, the sentence gate's z), validation
    mixes exactly like fixed:<that g> per sentence; `global` has no parameters; training moves b by the
    controller before the mix; rate 0 keeps b = 0, i.e. fixed:0.5."""
    _, task, model, hybrid = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", spec,
                                    "--dropout", "0", "--kd-gate-weight", "0")
    params = [n for n, _ in hybrid.named_parameters()]
    assert params == [] if spec == "global" else all(n.startswith("gate.") for n in params) and params
    sample = first_batch(task)
    bsz = sample["target"].size(0)
    hybrid.benefit.global_logit.fill_(0.8)
    if spec == "global":
        loss, size, log = criterion_loss(task, model, hybrid, sample)
        g = torch.sigmoid(torch.tensor(0.8, dtype=torch.float64)).item()
        ref, ref_size, _ = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, g)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and size == pytest.approx(ref_size)
        assert log["gate"] == pytest.approx(g * bsz) and log["gate_global"] == pytest.approx(0.8 * bsz)
    else:
        with torch.no_grad():
            hybrid.gate.out.bias.fill_(-0.3)
        _, _, log = criterion_loss(task, model, hybrid, sample)
        assert log["gate"] / bsz == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), rel=1e-5)
    hybrid.benefit.global_logit.zero_()
    _, _, log = criterion_loss(task, model, hybrid, sample, train=True)  # first batch: slow == fast, b stays 0
    assert log["gate_global"] == 0.0
    hybrid.benefit.mean_tok.mul_(0.5)  # as if the token loss had halved lately: b moves up, then mixes
    _, _, log = criterion_loss(task, model, hybrid, sample, train=True)
    assert hybrid.benefit.global_logit.item() > 0 and log["gate_global"] == pytest.approx(
        hybrid.benefit.global_logit.item() * bsz)

    _, task, model, still = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "global",
                                   "--dropout", "0", "--kd-gate-global-rate", "0")
    for _ in range(2):
        loss, size, log = criterion_loss(task, model, still, sample, train=True)
        still.benefit.mean_tok.mul_(0.5)
    ref, ref_size, _ = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, 0.5)
    assert still.benefit.global_logit.item() == 0.0 and log["gate"] == pytest.approx(0.5 * bsz)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and size == pytest.approx(ref_size)


def test_global_gate_trains_moves_within_its_bound_and_decodes_stock(data_bin, teacher, teacher_targets,
                                                                     tmp_path):
    """A real fairseq-train run with --kd-gate sentence+global: b leaves 0, stays within its bound (no
    collapse of the controller), the per-sentence gate keeps varying around sigmoid(b), b is saved in the
    checkpoint's criterion state and kd-gate-dump adds it; stock fairseq-generate decodes the student."""
    save, bound = str(tmp_path / "g"), 0.5
    log = kd_train(data_bin, save, "--criterion", "hybrid_kd", "--teacher-path", teacher, "--teacher-targets",
                   teacher_targets, "--label-smoothing", "0.1", "--kd-gate", "sentence+global",
                   "--kd-gate-global-rate", "0.5", "--kd-gate-global-bound", str(bound), max_update=120)
    fields = [dict(re.findall(r"(\w+)=(-?[\d.]+)", line)) for line in log.splitlines() if "train_inner" in line]
    rows = [(float(f["gate"]), float(f["gate_std"]), float(f["gate_global"])) for f in fields]
    assert len(rows) >= 3, log[-2000:]
    assert all(abs(b) <= bound for _, _, b in rows) and any(b != 0 for _, _, b in rows)
    for mean, std, b in rows[-3:]:
        assert abs(mean - torch.sigmoid(torch.tensor(b)).item()) < 0.1 and std > 0.005, (mean, std, b)
    state = load_state(save + "/checkpoint_last.pt")
    b = state["criterion"]["benefit.global_logit"].item()
    assert 0 < abs(b) <= bound
    out = run("fairseq-generate", data_bin, "--path", save + "/checkpoint_last.pt", "--gen-subset", "valid",
              "--beam", "2", "--batch-size", "64")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100
    tsv = str(tmp_path / "gate.tsv")
    run("kd-gate-dump", "--data", data_bin, "--path", save + "/checkpoint_last.pt", "--split", "valid", "--out", tsv)
    gates = torch.tensor([float(line.split("\t")[1]) for line in open(tsv).read().splitlines()[1:]])
    assert abs(gates.mean().item() - torch.sigmoid(torch.tensor(b)).item()) < 0.1
