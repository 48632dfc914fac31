"""kd_plugin.signals.aligned_log_probs: support (full / top-K), temperature and masking of teacher signals.
The K+1-bin top-K form against float64 references: tests/test_topk.py."""
import pytest
import torch
import torch.nn.functional as F

from kd_plugin.divergences import DIVERGENCES
from kd_plugin.signals import aligned_log_probs, signal_topk, topk_signal

B, T, V = 3, 5, 12
KW = {"js_beta": 0.3, "skew_lambda": 0.2}


def make(seed=0, dtype=torch.float32, scale=2.0):
    """(teacher logits z, student logits, mask): the mask drops a padded tail and one inner position."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(B, T, V, generator=g, dtype=dtype)
    student = scale * torch.randn(B, T, V, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1] = False
    return z, student, mask


def full_signal(z):
    return {"lprobs": F.log_softmax(z, -1)}


def aligned(signal, student_logits, *args, **kw):
    """aligned_log_probs with the student's log-probs, as the criterion passes them."""
    return aligned_log_probs(signal, F.log_softmax(student_logits, -1), *args, **kw)


def test_signal_topk():
    z, _, _ = make()
    assert signal_topk(full_signal(z)) == 0
    assert signal_topk(topk_signal(F.log_softmax(z, -1), 4)) == 4


def test_topk_signal_is_sorted_top_k():
    lprobs = F.log_softmax(make()[0], -1)
    sig = topk_signal(lprobs, 5)
    assert sig["topk_lprobs"].shape == sig["topk_ids"].shape == (B, T, 5)
    assert (sig["topk_lprobs"].diff(dim=-1) <= 0).all()
    assert torch.equal(lprobs.gather(-1, sig["topk_ids"]), sig["topk_lprobs"])
    assert (sig["topk_lprobs"][..., -1:] >= lprobs.sort(-1, descending=True).values[..., 5:]).all()


def test_full_signal_keeps_masked_positions_in_order():
    z, student, mask = make()
    lp, lq = aligned(full_signal(z), student, mask)
    n = int(mask.sum())
    assert n == B * T - 3 and lp.shape == lq.shape == (n, V)
    torch.testing.assert_close(lp, F.log_softmax(z, -1)[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(lq, F.log_softmax(student, -1)[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("topk", [0, 4])
def test_empty_mask(topk):
    z, student, mask = make()
    lp, lq = aligned(full_signal(z), student, torch.zeros_like(mask), topk=topk)
    assert lp.shape == lq.shape == (0, topk + 1 if topk else V)  # K ids + the rest bin
    assert DIVERGENCES["forward_kl"](lp, lq).shape == (0,)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_temperature_of_a_single_teacher(temperature):
    """Teacher given as log_softmax(z): the tempered full lp is log_softmax(z / T) (float64 reference);
    float64 inputs are computed in float64, float32 ones in float32."""
    z, student, mask = make(seed=1, dtype=torch.float64, scale=4.0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        lp, lq = aligned(full_signal(z.to(dtype)), student.to(dtype), mask, temperature=temperature)
        assert lp.dtype == lq.dtype == dtype
        torch.testing.assert_close(lp.double(), F.log_softmax(z / temperature, -1)[mask], rtol=tol, atol=tol)
        torch.testing.assert_close(lq.double(), F.log_softmax(student / temperature, -1)[mask], rtol=tol, atol=tol)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_topk_equal_to_vocab_equals_full(name, temperature):
    z, student, mask = make(seed=3)
    div = DIVERGENCES[name]
    full = div(*aligned(full_signal(z), student, mask, temperature), **KW)
    for sig, topk in ((full_signal(z), V), (topk_signal(F.log_softmax(z, -1), V), 0),
                      (topk_signal(F.log_softmax(z, -1), V), V)):
        got = div(*aligned(sig, student, mask, temperature, topk), **KW)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_of_full_signal_equals_precomputed_topk_signal(temperature):
    k = 5
    z, student, mask = make(seed=4)
    lprobs = F.log_softmax(z, -1)
    want = aligned(full_signal(z), student, mask, temperature, topk=k)
    for topk in (0, k):
        got = aligned(topk_signal(lprobs, k), student, mask, temperature, topk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_smaller_than_signal_takes_the_first_k():
    z, student, mask = make(seed=5)
    lprobs = F.log_softmax(z, -1)
    got = aligned(topk_signal(lprobs, 8), student, mask, temperature=2.0, topk=3)
    want = aligned(topk_signal(lprobs, 3), student, mask, temperature=2.0)
    assert got[0].shape == (int(mask.sum()), 4)  # the dropped 5 ids join the rest bin
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_topk_larger_than_signal_names_the_flag():
    z, student, mask = make()
    with pytest.raises(ValueError, match="--kd-topk"):
        aligned(topk_signal(F.log_softmax(z, -1), 4), student, mask, topk=5)


def test_cached_signal_dtypes():
    """An offline cache may store fp16 log-probs and int16/int32 ids: the result is float32 as from fp32."""
    z, student, mask = make(seed=6)
    sig = topk_signal(F.log_softmax(z, -1), 6)
    cached = {"topk_lprobs": sig["topk_lprobs"].half(), "topk_ids": sig["topk_ids"].int(),
              "topk_rest": sig["topk_rest"].half()}
    lp, lq = aligned(cached, student, mask, temperature=2.0)
    want_lp, want_lq = aligned({"topk_lprobs": sig["topk_lprobs"].half().float(), "topk_ids": sig["topk_ids"],
                                "topk_rest": sig["topk_rest"].half().float()}, student, mask, temperature=2.0)
    assert lp.dtype == lq.dtype == torch.float32
    assert torch.equal(lp, want_lp) and torch.equal(lq, want_lq)
    lp16, lq16 = aligned(full_signal(z.half()), student.half(), mask)
    assert lp16.dtype == lq16.dtype == torch.float32


@pytest.mark.parametrize("topk", [0, 4])
def test_student_gradient_only_at_kept_positions(topk):
    """Every id of a kept position gets a gradient, also outside the top-K (through the rest bin)."""
    z, student, mask = make(seed=7)
    student.requires_grad_(True)
    lp, lq = aligned(full_signal(z), student, mask, temperature=2.0, topk=topk)
    DIVERGENCES["forward_kl"](lp, lq).sum().backward()
    assert torch.equal(student.grad.ne(0), mask.unsqueeze(-1).expand(B, T, V))
