"""kd_plugin.divergences against independent float64 references written from the textbook formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd_plugin.divergences import DIVERGENCES, get_divergence


# ---- float64 references on probabilities p (teacher), q (student): sum_c p_c log(p_c / q_c) with 0 log 0 = 0


def ref_kl(p, q):
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def ref_js(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


REFERENCES = {
    "forward_kl": lambda p, q, **kw: ref_kl(p, q),
    "reverse_kl": lambda p, q, **kw: ref_kl(q, p),
    "js": lambda p, q, js_beta, **kw: ref_js(p, q, js_beta),
    "tvd": lambda p, q, **kw: 0.5 * (p - q).abs().sum(-1),
    "skew_forward_kl": lambda p, q, skew_lambda, **kw: ref_kl(p, skew_lambda * p + (1 - skew_lambda) * q),
    "skew_reverse_kl": lambda p, q, skew_lambda, **kw: ref_kl(q, skew_lambda * q + (1 - skew_lambda) * p),
}

# (name, the divergence's own parameter); every case is called with both keywords, as the criterion does
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {})]
CASES += [("js", {"js_beta": b}) for b in (0.5, 0.1, 0.9)]
CASES += [(n, {"skew_lambda": lam}) for n in ("skew_forward_kl", "skew_reverse_kl") for lam in (0.1, 0.5)]
EDGE_CASES = [("js", {"js_beta": b}) for b in (0.0, 1.0)]
EDGE_CASES += [(n, {"skew_lambda": lam}) for n in ("skew_forward_kl", "skew_reverse_kl") for lam in (0.0, 1.0)]
IDS = ["%s%s" % (n, "".join("-%s=%g" % kv for kv in kw.items())) for n, kw in CASES]
EDGE_IDS = ["%s%s" % (n, "".join("-%s=%g" % kv for kv in kw.items())) for n, kw in EDGE_CASES]

# (shape, logit scale, near one-hot): scales from almost uniform to peaked; one-hot = 25 * e_argmax + noise
INPUTS = [((7, 5), 0.1, False), ((2, 3, 11), 1.0, False), ((13,), 3.0, False), ((4, 2), 2.0, False),
          ((6, 40), 8.0, False), ((5, 17), 1.0, True), ((3, 4, 9), 0.5, True)]
INPUT_IDS = ["%s-x%g%s" % ("x".join(map(str, s)), sc, "-onehot" if oh else "") for s, sc, oh in INPUTS]


def kwargs_of(params):
    kw = {"js_beta": 0.5, "skew_lambda": 0.1}
    kw.update(params)
    return kw


def random_logits(shape, scale, one_hot, seed):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    if one_hot:
        hot = torch.randint(shape[-1], shape[:-1] + (1,), generator=g)
        z = z + torch.zeros_like(z).scatter_(-1, hot, 25.0)
    return z


def pair(shape, scale, one_hot, seed=0):
    """Teacher and student logits (float64), drawn independently."""
    return random_logits(shape, scale, one_hot, seed), random_logits(shape, scale, one_hot, seed + 1)


def impl_and_ref(name, params, zt, zs, dtype):
    """(implementation on log_softmax in ``dtype``, float64 reference), both differentiable w.r.t. zs."""
    kw = kwargs_of(params)
    zs = zs.detach().clone().requires_grad_(True)
    zs_cast = zs.detach().to(dtype).requires_grad_(True)
    got = DIVERGENCES[name](F.log_softmax(zt.to(dtype), -1), F.log_softmax(zs_cast, -1), **kw)
    want = REFERENCES[name](F.softmax(zt, -1), F.softmax(zs, -1), **kw)
    (g_got,) = torch.autograd.grad(got.sum(), zs_cast)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    return got.detach(), want.detach(), g_got, g_want


def test_every_divergence_has_a_reference_and_is_found_by_name():
    assert set(DIVERGENCES) == set(REFERENCES)
    for name, fn in DIVERGENCES.items():
        assert get_divergence(name) is fn


def test_unknown_divergence_names_the_flag():
    with pytest.raises(ValueError, match="--kd-divergence") as err:
        get_divergence("kl_forward")
    assert "kl_forward" in str(err.value) and "forward_kl" in str(err.value)


@pytest.mark.parametrize("shape,scale,one_hot", INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_float64_value_and_gradient_match_reference(name, params, shape, scale, one_hot):
    zt, zs = pair(shape, scale, one_hot, seed=hash((shape, scale)) % 1000)
    got, want, g_got, g_want = impl_and_ref(name, params, zt, zs, torch.float64)
    assert got.shape == shape[:-1] and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,scale,one_hot", INPUTS, ids=INPUT_IDS)
@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_float32_value_and_gradient_close_to_float64_reference(name, params, shape, scale, one_hot):
    zt, zs = pair(shape, scale, one_hot, seed=hash((shape, scale)) % 1000 + 7)
    got, want, g_got, g_want = impl_and_ref(name, params, zt, zs, torch.float32)
    assert got.dtype == torch.float32
    # log-probs of peaked logits reach |lq| ~ 30 * scale, so float32 rounding is relative to that size
    tol = 2e-6 * max(1.0, scale) * (25 if one_hot else 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=tol)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_gradient_wrt_student_log_probs_matches_reference(name, params):
    """The student log-probs as free inputs (how the divergence sees them), not only through a softmax."""
    zt, zs = pair((5, 9), 2.0, False, seed=3)
    lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1).requires_grad_(True)
    kw = kwargs_of(params)
    (g_got,) = torch.autograd.grad(DIVERGENCES[name](lp, lq, **kw).sum(), lq)
    (g_want,) = torch.autograd.grad(REFERENCES[name](lp.exp(), lq.exp(), **kw).sum(), lq)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_gradcheck_finite_differences(name, params):
    zt, zs = pair((2, 5), 1.5, False, seed=11)
    lp, kw = F.log_softmax(zt, -1), kwargs_of(params)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: DIVERGENCES[name](lp, F.log_softmax(z, -1), **kw), (zs,), fast_mode=True)


def test_kl_gradients_wrt_logits_analytic():
    """d KL(p||q) / dz = q - p;  d KL(q||p) / dz_j = q_j (log q_j - log p_j - KL(q||p))."""
    zt, zs = pair((6, 10), 2.0, False, seed=5)
    zs.requires_grad_(True)
    lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    p, q = lp.exp(), lq.exp().detach()
    (g,) = torch.autograd.grad(DIVERGENCES["forward_kl"](lp, lq).sum(), zs)
    torch.testing.assert_close(g, q - p, rtol=1e-10, atol=1e-13)
    lq = F.log_softmax(zs, -1)
    rkl = DIVERGENCES["reverse_kl"](lp, lq)
    (g,) = torch.autograd.grad(rkl.sum(), zs)
    torch.testing.assert_close(g, q * (lq.detach() - lp - rkl.detach().unsqueeze(-1)), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_zero_on_identical_distributions_and_non_negative(name, params, dtype, atol):
    kw = kwargs_of(params)
    for shape, scale, one_hot in INPUTS:
        zt, zs = pair(shape, scale, one_hot, seed=21)
        lp = F.log_softmax(zt.to(dtype), -1)
        assert DIVERGENCES[name](lp, lp, **kw).abs().max() <= atol
        # nearly identical distributions, where rounding could make a naive sum negative
        lq_near = F.log_softmax((zt + 1e-3 * zs).to(dtype), -1)
        for lq in (lq_near, F.log_softmax(zs.to(dtype), -1)):
            assert DIVERGENCES[name](lp, lq, **kw).min() >= -atol


def test_js_with_half_beta_is_symmetric():
    for shape, scale, one_hot in INPUTS:
        zt, zs = pair(shape, scale, one_hot, seed=31)
        lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        torch.testing.assert_close(DIVERGENCES["js"](lp, lq, js_beta=0.5), DIVERGENCES["js"](lq, lp, js_beta=0.5),
                                   rtol=1e-12, atol=1e-14)
    # and not for other betas: the swap maps beta to 1 - beta
    zt, zs = pair((5, 8), 1.0, False, seed=32)
    lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    torch.testing.assert_close(DIVERGENCES["js"](lp, lq, js_beta=0.2), DIVERGENCES["js"](lq, lp, js_beta=0.8),
                               rtol=1e-12, atol=1e-14)
    assert not torch.allclose(DIVERGENCES["js"](lp, lq, js_beta=0.2), DIVERGENCES["js"](lq, lp, js_beta=0.2))


def disjoint_one_hots(dtype, v=6, peak=60.0):
    """Teacher on token 0, student on token 1, both near one-hot: the divergences' worst case."""
    zt = torch.zeros(2, v, dtype=dtype)
    zs = torch.zeros(2, v, dtype=dtype)
    zt[:, 0], zs[:, 1] = peak, peak
    return F.log_softmax(zt, -1), F.log_softmax(zs, -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_js_bounded_by_binary_entropy_of_beta_at_most_log2(dtype):
    """JS_b(p, q) <= h(b) = -b log b - (1-b) log(1-b) <= log 2, with equality for disjoint supports."""
    slack = 1e-12 if dtype == torch.float64 else 1e-6
    for beta in (0.5, 0.1, 0.3, 0.9):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        for shape, scale, one_hot in INPUTS:
            zt, zs = pair(shape, scale, one_hot, seed=41)
            d = DIVERGENCES["js"](F.log_softmax(zt.to(dtype), -1), F.log_softmax(zs.to(dtype), -1), js_beta=beta)
            assert d.max() <= h + slack <= math.log(2) + slack
        lp, lq = disjoint_one_hots(dtype)
        torch.testing.assert_close(DIVERGENCES["js"](lp, lq, js_beta=beta).double(),
                                   torch.full((2,), h, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tvd_in_unit_interval(dtype):
    for shape, scale, one_hot in INPUTS:
        zt, zs = pair(shape, scale, one_hot, seed=51)
        d = DIVERGENCES["tvd"](F.log_softmax(zt.to(dtype), -1), F.log_softmax(zs.to(dtype), -1))
        assert d.min() >= 0 and d.max() <= 1
    lp, lq = disjoint_one_hots(dtype)
    torch.testing.assert_close(DIVERGENCES["tvd"](lp, lq).double(), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_edge_parameters():
    """lambda = 0 is the plain KL (exactly); lambda = 1 and beta in {0, 1} compare a distribution with itself."""
    for shape, scale, one_hot in INPUTS:
        zt, zs = pair(shape, scale, one_hot, seed=61)
        lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        torch.testing.assert_close(DIVERGENCES["skew_forward_kl"](lp, lq, skew_lambda=0.0),
                                   DIVERGENCES["forward_kl"](lp, lq), rtol=1e-13, atol=0)
        torch.testing.assert_close(DIVERGENCES["skew_reverse_kl"](lp, lq, skew_lambda=0.0),
                                   DIVERGENCES["reverse_kl"](lp, lq), rtol=1e-13, atol=0)
        for name, kw in [("skew_forward_kl", {"skew_lambda": 1.0}), ("skew_reverse_kl", {"skew_lambda": 1.0}),
                         ("js", {"js_beta": 0.0}), ("js", {"js_beta": 1.0})]:
            assert DIVERGENCES[name](lp, lq, **kw).abs().max() < 1e-12


@pytest.mark.parametrize("name,params", CASES + EDGE_CASES, ids=IDS + EDGE_IDS)
def test_finite_values_and_gradients_on_extreme_inputs(name, params):
    """float32, teacher and student near one-hot on different tokens (probabilities underflow to exactly 0)."""
    lp, _ = disjoint_one_hots(torch.float32, peak=200.0)
    zs = torch.zeros(2, 6)
    zs[:, 1] = 200.0
    zs.requires_grad_(True)
    d = DIVERGENCES[name](lp, F.log_softmax(zs, -1), **kwargs_of(params))
    (g,) = torch.autograd.grad(d.sum(), zs)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_teacher_zero_probabilities(name, params):
    """A teacher with exact zeros (log-prob -inf) gives finite student gradients; only KL(q||p) is infinite."""
    zt, zs = pair((4, 7), 1.0, False, seed=71)
    zt[:, 3] = float("-inf")
    zs.requires_grad_(True)
    kw = kwargs_of(params)
    lp, lq = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    d = DIVERGENCES[name](lp, lq, **kw)
    want = REFERENCES[name](F.softmax(zt, -1), F.softmax(zs, -1), **kw)
    if name == "reverse_kl":
        assert torch.isinf(d).all()
        return
    (g,) = torch.autograd.grad(d.sum(), zs)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(d, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-12)


# ---- full_vocab_divergence: the chunked, hand-differentiated path the criteria use over the full vocabulary


def masked_batch(seed=81):
    """float64 student logits and teacher log-probs (3 x 4 x 7) and a mask excluding 5 of the 12 rows."""
    zs, zt = pair((3, 4, 7), 2.0, False, seed=seed)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return zs, F.log_softmax(zt, -1), mask


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_full_vocab_divergence_chunked_value_and_gradient(name, params, temperature, monkeypatch):
    """float64, 2 rows per chunk (6 chunks), masked rows: values equal the plain computation of
    aligned_log_probs (masked rows, log_softmax(. / T)) + the divergence, gradients w.r.t. the student's
    logits (through the log_softmax that makes lq, as in the criteria) equal autograd of that reference and
    pass gradcheck; excluded rows get an exactly zero gradient, also when they hold NaN."""
    from kd_plugin import divergences

    monkeypatch.setattr(divergences, "CHUNK_ELEMENTS", 14)
    assert len(divergences._chunks(12, 7)) == 6
    fn, kw, t = DIVERGENCES[name], kwargs_of(params), temperature
    zs, lp, mask = masked_batch()

    def chunked(z):
        return divergences.full_vocab_divergence(fn, F.log_softmax(z, -1), lp, mask, t, **kw)

    def reference(z):  # aligned_log_probs without its float32 cast
        return fn(F.log_softmax(lp[mask] / t, -1), F.log_softmax(F.log_softmax(z, -1)[mask] / t, -1), **kw)

    z = zs.clone().requires_grad_(True)
    got, want = chunked(z), reference(z)
    assert got.dtype == torch.float64 and got.shape == (int(mask.sum()),)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    weights = torch.linspace(0.5, 2.0, got.numel(), dtype=torch.float64)  # not just the sum
    (g_got,) = torch.autograd.grad((weights * got).sum(), z)
    (g_want,) = torch.autograd.grad((weights * want).sum(), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
    assert g_got[mask].abs().sum() > 0 and g_got[~mask].eq(0).all()
    assert torch.autograd.gradcheck(chunked, (zs.clone().requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)

    # w.r.t. the log-probs themselves: excluded rows exactly 0 even where they are not finite
    lq = F.log_softmax(zs, -1)
    lq[~mask] = float("nan")
    lq.requires_grad_(True)
    lp_nan = lp.clone()
    lp_nan[~mask] = float("nan")
    d = divergences.full_vocab_divergence(fn, lq, lp_nan, mask, t, **kw)
    torch.testing.assert_close(d, want.detach(), rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(d.sum(), lq)
    assert g[~mask].eq(0).all() and torch.isfinite(g).all()
