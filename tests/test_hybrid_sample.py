"""hybrid_kd --kd-gate sample:<v>: each training sentence runs on ONE prefix (a B-row pass), drawn with
probability v for the gold one; the loss is exactly the per-sentence mix with those 0/1 weights, and
validation is fixed:<v>'s."""
import pytest
import torch

from inproc import criterion_loss, first_batch
from test_hybrid_kd import _build, _fixed_loss


def _sampled(data_bin, teacher, teacher_targets, value="0.5"):
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "sample:" + value,
                                  "--dropout", "0")
    return task, model, crit


def test_complementary_draws_sum_to_both_single_levels(data_bin, teacher, teacher_targets):
    """With the draw forced to a mask m and then to 1 - m, the two B-row losses add up to fixed:1 + fixed:0
    on the 2B pass (every sentence's token terms once, its sentence terms once), sample sizes too; all-gold
    equals fixed:1 (token_kd) and all-teacher fixed:0 (sentence_kd). A row that ran the wrong prefix would
    break the sums."""
    task, model, crit = _sampled(data_bin, teacher, teacher_targets)
    sample = first_batch(task)
    bsz = sample["target"].size(0)
    m = torch.arange(bsz) % 3 == 0
    out = {}
    for name, mask in (("m", m), ("not m", ~m), ("all", torch.ones_like(m)), ("none", torch.zeros_like(m))):
        crit.draw = lambda n, device, mask=mask: mask
        out[name] = criterion_loss(task, model, crit, sample, train=True)
    tok = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, 1.0)
    sent = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, 0.0)
    assert out["m"][0].item() + out["not m"][0].item() == pytest.approx(tok[0].item() + sent[0].item(), rel=1e-5)
    assert out["m"][1] + out["not m"][1] == pytest.approx(tok[1] + sent[1])
    for name, ref in (("all", tok), ("none", sent)):
        assert out[name][0].item() == pytest.approx(ref[0].item(), rel=1e-5) and out[name][1] == pytest.approx(ref[1])
    assert out["m"][2]["gate"] == int(m.sum()) and out["all"][2]["nll_loss"] == pytest.approx(tok[2]["nll_loss"].item(),
                                                                                             rel=1e-5)


def test_draws_follow_v_and_validation_is_fixed(data_bin, teacher, teacher_targets):
    """The real draw: about v of the sentences take the gold prefix (v = 0.25 over 40 batches' worth of
    draws); in validation the loss is fixed:v's exactly; --kd-select other than all is refused."""
    task, model, crit = _sampled(data_bin, teacher, teacher_targets, "0.25")
    torch.manual_seed(0)
    share = torch.stack([crit.draw(1000, "cpu") for _ in range(4)]).float().mean().item()
    assert 0.23 < share < 0.27
    sample = first_batch(task)
    loss, size, _ = criterion_loss(task, model, crit, sample)
    ref, ref_size, _ = _fixed_loss(data_bin, teacher, teacher_targets, model, sample, 0.25)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and size == pytest.approx(ref_size)
    with pytest.raises(Exception, match="--kd-select all"):
        _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate", "sample:0.5", "--kd-select", "batch")
