"""Top-K KD over K+1 bins (kd_plugin.signals): the teacher's K ids plus the mass outside them, against
float64 references; its gradient outside the top-K; its limits; its numerical safety; the cache's dtypes."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.trainer import Trainer

from kd_plugin.data.teacher_cache import LPROBS_DTYPE, OFFSETS_DTYPE, TeacherCache, suffixes, topk_and_rest
from kd_plugin.divergences import DIVERGENCES
from kd_plugin.signals import REST_FLOOR, aligned_log_probs, log1mexp, topk_signal
from test_divergences import CASES, IDS, REFERENCES, kwargs_of

B, T, V, K = 3, 4, 10, 3
TEMPERATURES = [0.5, 1.0, 2.0]
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


def logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)


def reference_bins(p, ids, temperature):
    """float64 reference: probabilities p (N x V) -> the K+1 bins (K ids, then the rest summed over the
    other ids), each raised to 1/T and renormalized (the module doc's definition of temperature)."""
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    bins = torch.cat([p.gather(-1, ids), (p * outside).sum(-1, keepdim=True)], -1) ** (1.0 / temperature)
    return bins / bins.sum(-1, keepdim=True)


def kd(name, kw, signal, zs, temperature, topk=0, mask=MASK):
    """Per-position D over the aligned support, from student logits zs (log-probs as the criterion passes)."""
    return DIVERGENCES[name](*aligned_log_probs(signal, F.log_softmax(zs, -1), mask, temperature, topk), **kw)


def outside_topk(zt, k=K):
    """B x T x V: True at the ids outside the teacher's top-k of kept positions."""
    return torch.ones_like(zt, dtype=torch.bool).scatter(-1, zt.topk(k, -1).indices, False) & MASK.unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_bins_equal_float64_reference(name, params, temperature, dtype):
    """Value and gradient w.r.t. the student's logits; the gradient reaches the ids outside the top-K."""
    kw, zt, zs = kwargs_of(params), logits(0), logits(1)
    z = zs.clone().requires_grad_(True)
    ids = zt.topk(K, -1).indices[MASK]
    want = REFERENCES[name](reference_bins(F.softmax(zt, -1)[MASK], ids, temperature),
                            reference_bins(F.softmax(z, -1)[MASK], ids, temperature), **kw)
    (g_want,) = torch.autograd.grad(want.sum(), z)
    zc = zs.to(dtype).requires_grad_(True)
    got = kd(name, kw, topk_signal(F.log_softmax(zt.to(dtype), -1), K), zc, temperature)
    (g_got,) = torch.autograd.grad(got.sum(), zc)
    assert got.dtype == dtype and got.shape == (int(MASK.sum()),)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got.double(), g_want, rtol=tol, atol=tol)
    outside = outside_topk(zt)
    assert g_want[outside].ne(0).all() and g_got[outside].ne(0).all()
    assert g_got[~MASK].eq(0).all()


def test_forward_kl_gradient_outside_topk_is_analytic():
    """T = 1, forward KL over the bins: d/dz_v = q_v - p_v inside the top-K and q_v (1 - p_rest / q_rest)
    outside it (renormalizing over the K ids alone gave exactly 0 there: the defect this form fixes)."""
    zt, zs = logits(2), logits(3)
    z = zs.clone().requires_grad_(True)
    got = kd("forward_kl", {}, topk_signal(F.log_softmax(zt, -1), K), z, 1.0)
    (grad,) = torch.autograd.grad(got.sum(), z)
    p, q, outside = F.softmax(zt, -1), F.softmax(zs, -1), outside_topk(zt)
    p_rest, q_rest = (p * outside).sum(-1, keepdim=True), (q * outside).sum(-1, keepdim=True)
    want = torch.where(outside, q * (1 - p_rest / q_rest), q - p) * MASK.unsqueeze(-1)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    assert grad[outside].abs().min() > 1e-6


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_k_equal_to_vocab_is_the_full_vocabulary(name, params, temperature):
    """K = V: no rest bin, whatever the rest value says (-inf online, the fp16 floor in the cache), and
    the divergence and its gradient equal the full-vocabulary float64 reference at every T."""
    kw, zt, zs = kwargs_of(params), logits(4), logits(5)
    z = zs.clone().requires_grad_(True)
    tempered = [F.softmax(x / temperature, -1)[MASK] for x in (zt, z)]
    want = REFERENCES[name](*tempered, **kw)
    (g_want,) = torch.autograd.grad(want.sum(), z)
    signal = topk_signal(F.log_softmax(zt, -1), V)
    assert signal["topk_rest"].eq(float("-inf")).all()
    for rest in (signal["topk_rest"], torch.full((B, T), REST_FLOOR, dtype=torch.float64)):
        got = kd(name, kw, dict(signal, topk_rest=rest), z, temperature)
        (g_got,) = torch.autograd.grad(got.sum(), z)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale,one_hot", [(2.0, 0.0), (2.0, 30.0)], ids=["spread", "peaked"])
def test_online_rest_mass_is_one_minus_topk_mass(scale, one_hot):
    """topk_signal (float32) against float64: exp(rest) = 1 - sum_k p_k (the reference sums the other ids),
    to a relative accuracy also where the top-K hold all but < 1e-7 of the mass (float32 1 - sum: 0)."""
    z = logits(6, scale)
    z[..., 0] += one_hot
    p = F.softmax(z, -1)
    for k in (1, K, V - 1):
        sig = topk_signal(F.log_softmax(z.float(), -1), k)
        outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, sig["topk_ids"], False)
        want = torch.log((p * outside).sum(-1))
        torch.testing.assert_close(want.exp(), 1 - p.gather(-1, sig["topk_ids"]).sum(-1), rtol=1e-9, atol=1e-15)
        if one_hot:
            assert want.max() < math.log(1e-7)
        torch.testing.assert_close(sig["topk_rest"].double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(topk_and_rest(F.log_softmax(z.float(), -1), k)[2], sig["topk_rest"])


def test_signal_truncated_to_fewer_ids_moves_their_mass_to_the_rest():
    lprobs = F.log_softmax(logits(7), -1)
    got = aligned_log_probs(topk_signal(lprobs, 6), F.log_softmax(logits(8), -1), MASK, 1.0, topk=K)
    want = aligned_log_probs(topk_signal(lprobs, K), F.log_softmax(logits(8), -1), MASK, 1.0)
    assert got[0].shape == (int(MASK.sum()), K + 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_log1mexp_is_accurate_near_zero_and_far_below():
    """Relative accuracy from x = -1e-30 (log 1e-30) to x = -80 (-1.8e-35, to 1e-30 absolute)."""
    x64 = -torch.tensor([1e-30, 1e-12, 1e-7, 1e-3, 0.5, math.log(2), 1, 5, 20, 80, 1e4], dtype=torch.float64)
    # float64 reference: log(-expm1(x)) near 0; below -log 2 the series -sum_n e^(nx) / n (log(1 - tiny) loses digits)
    series = -sum(torch.exp(n * x64) / n for n in range(1, 80))
    want = torch.where(x64 > -math.log(2), torch.log(-torch.expm1(x64)), series)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-14)):
        got = log1mexp(x64.to(dtype))
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-30)
    assert log1mexp(torch.tensor(float("-inf"))).item() == 0


def peaked(zt, student_on_topk):
    """Teacher logits with its top-1 at +30 (top-K mass 1 - 1e-13); student logits, +60 on the teacher's
    top-K when ``student_on_topk`` (its rest mass then underflows: sum_k q_k rounds to 1 in float32)."""
    zt = zt.clone()
    zt[..., 0] += 30.0
    zs = logits(9).float()
    if student_on_topk:
        zs = zs + 60.0 * torch.zeros_like(zs).scatter(-1, zt.topk(K, -1).indices, 1.0)
    return zt, zs


@pytest.mark.parametrize("student_on_topk", [False, True], ids=["student-spread", "student-rest-underflows"])
@pytest.mark.parametrize("rest", ["stored", "-inf"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_numerical_safety(name, params, temperature, rest, student_on_topk):
    """An fp16 teacher whose top-K log-probs say mass 1 (top-1 stored as 0), its rest stored (about -27) or
    -inf; a student whose rest underflows or not: values and gradients finite. Where both rest masses
    are (numerically) 0 the rest bin contributes exactly 0: D equals D over the K ids alone."""
    zt, zs = peaked(logits(10), student_on_topk)
    sig = topk_signal(F.log_softmax(zt.float(), -1), K)
    cached = {"topk_lprobs": sig["topk_lprobs"].half(), "topk_ids": sig["topk_ids"],
              "topk_rest": sig["topk_rest"].half() if rest == "stored" else torch.full((B, T), float("-inf"))}
    assert cached["topk_lprobs"][..., 0].eq(0).all() and cached["topk_lprobs"].float().exp().sum(-1).ge(1).all()
    z = zs.requires_grad_(True)
    kw = kwargs_of(params)
    lp, lq = aligned_log_probs(cached, F.log_softmax(z, -1), MASK, temperature)
    d = DIVERGENCES[name](lp, lq, **kw)
    (grad,) = torch.autograd.grad(d.sum(), z)
    assert torch.isfinite(lp).all() and torch.isfinite(lq).all()
    assert torch.isfinite(d).all() and torch.isfinite(grad).all() and grad[~MASK].eq(0).all()
    if rest == "-inf" and student_on_topk:
        assert lp[:, K].exp().eq(0).all() and lq[:, K].exp().eq(0).all()
        inside = DIVERGENCES[name](F.log_softmax(lp[:, :K], -1), F.log_softmax(lq[:, :K], -1), **kw)
        torch.testing.assert_close(d, inside, rtol=1e-6, atol=1e-7)


def write_cache(prefix, rows, k):
    """A two-sentence cache store (the part files kd-dump-teacher writes, no header): rows[i] = L_i tokens."""
    sfx = suffixes(np.dtype("<u2"))
    g = np.random.default_rng(0)
    n = sum(rows)
    lprobs = np.sort(np.log(g.dirichlet(np.ones(k + 2), n)[:, :k]), 1)[:, ::-1].astype(LPROBS_DTYPE)
    lprobs.tofile(prefix + sfx["lprobs"])
    np.arange(n * k, dtype="<u2").reshape(n, k).tofile(prefix + sfx["ids"])
    rest = np.log1p(-np.exp(lprobs.astype(np.float64)).sum(1)).astype(LPROBS_DTYPE)
    rest.tofile(prefix + sfx["rest"])
    np.concatenate([[0], np.cumsum(rows)]).astype(OFFSETS_DTYPE).tofile(prefix + sfx["offsets"])
    return lprobs, rest


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_collated_cache_stays_fp16_through_the_trainer_cast(tmp_path, precision):
    """The collated log-probs and rest keep the stored float16 (fairseq's Trainer casts float32 sample
    tensors to the training dtype: bf16 would round them), ids are int64; samples in batch order."""
    pad, k, rows = 1, 2, [3, 2]
    prefix = str(tmp_path / "valid.topk")
    lprobs, rest = write_cache(prefix, rows, k)
    cache = TeacherCache(prefix, k, "<u2", pad, left_pad=False)
    order = [1, 0]  # the batch's order (KDLanguagePairDataset passes items in sample["id"] order)
    target = torch.tensor([[5, 6, pad], [7, 8, 9]])
    sample = {"id": torch.tensor(order), "target": target}
    cache.collate([cache[i] for i in order], sample)
    trainer = SimpleNamespace(cfg=SimpleNamespace(common=SimpleNamespace(fp16=precision == "fp16",
                                                                         bf16=precision == "bf16")))
    sig = Trainer._fp_convert_sample(trainer, sample)["teacher"]
    assert sig["topk_lprobs"].dtype == sig["topk_rest"].dtype == torch.float16
    assert sig["topk_ids"].dtype == torch.int64
    for b, i in enumerate(order):
        lo, n = sum(rows[:i]), rows[i]
        assert np.array_equal(sig["topk_lprobs"][b, :n].numpy(), lprobs[lo:lo + n])
        assert np.array_equal(sig["topk_rest"][b, :n].numpy(), rest[lo:lo + n])
        assert np.array_equal(sig["topk_ids"][b, :n].numpy(), np.arange(lo * k, (lo + n) * k).reshape(n, k))
    assert not sig["topk_lprobs"][target.eq(pad)].any() and not sig["topk_rest"][target.eq(pad)].any()
