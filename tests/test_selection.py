"""Selective KD: kd_plugin.selection, and the token_kd criterion's per-token KD term built on it."""
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from omegaconf import OmegaConf

from kd_plugin.criterions.token_kd import TokenKDConfig, TokenKDCriterion
from kd_plugin.tasks.translation_kd import TranslationKDConfig, TranslationKDTask
from kd_plugin.selection import GlobalCEQueue, select_batch


def distinct(n, seed=0):
    """n distinct random values (no ties, so "the k largest" is a unique set)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).float() / 7 + torch.rand(n, generator=g) / 100


def exact_k(rate, n):
    """ceil(rate * n) in exact decimal arithmetic (the rate as the user wrote it), at least 1."""
    return min(n, max(1, math.ceil(Fraction(repr(rate)) * n)))


def check_largest(ce, mask, k):
    assert mask.dtype == torch.bool and mask.shape == ce.shape and int(mask.sum()) == k
    if k < ce.numel():
        assert ce[mask].min() > ce[~mask].max()


@pytest.mark.parametrize("n", [1, 2, 7, 40, 333])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_select_batch_picks_ceil_rn_largest(rate, n):
    ce = distinct(n, seed=n)
    check_largest(ce, select_batch(ce, rate), exact_k(rate, n))


@pytest.mark.parametrize("rate,n", [(0.07, 100), (0.14, 50), (0.14, 100), (0.28, 25)])
def test_select_batch_exact_for_decimal_rates(rate, n):
    """ceil(0.07 * 100) is 7, but 0.07 * 100 == 7.000000000000001 in floating point."""
    ce = distinct(n, seed=1)
    check_largest(ce, select_batch(ce, rate), exact_k(rate, n))


def test_select_batch_ties_and_empty():
    assert int(select_batch(torch.ones(10), 0.3).sum()) == 3
    assert select_batch(torch.zeros(0), 0.5).shape == (0,)


def test_select_batch_gradient_free_and_same_device():
    ce = distinct(9).requires_grad_(True)
    mask = select_batch(ce, 0.5)
    assert not mask.requires_grad and mask.device == ce.device


class ReferenceQueue:
    """The FIFO in plain Python: every value pushed, in order."""

    def __init__(self, size):
        self.size, self.history = size, []

    def push(self, ce):
        self.history += ce.tolist()

    def last(self):
        return np.array(self.history[-self.size:], dtype=np.float64)

    def threshold(self, rate):
        return np.quantile(self.last(), 1.0 - rate)


def check_queue(queue, ref):
    """Slot (count - 1 - i) % Q holds the i-th most recent value; count is the number pushed."""
    size, last = queue.values.numel(), ref.last()
    assert int(queue.count) == len(ref.history)
    slots = [(len(ref.history) - 1 - i) % size for i in range(len(last))]
    np.testing.assert_array_equal(queue.values[slots].numpy(), last[::-1].astype(np.float32))


def test_global_queue_fifo_wraps_around():
    size = 10
    queue, ref = GlobalCEQueue(size), ReferenceQueue(size)
    g = torch.Generator().manual_seed(0)
    for n in (3, 4, 1, 6, 10, 2, 9, 5, 7):  # fills, wraps, pushes a whole queue, wraps again
        ce = torch.rand(n, generator=g) * 5
        queue.push(ce)
        ref.push(ce)
        check_queue(queue, ref)
        for rate in (0.1, 0.3, 0.5, 1.0):
            assert float(queue.threshold(rate)) == pytest.approx(ref.threshold(rate), rel=1e-6, abs=1e-6)


def test_global_queue_push_longer_than_queue_keeps_the_last_values():
    queue = GlobalCEQueue(4)
    queue.push(torch.arange(3.0))
    queue.push(torch.arange(10.0, 19.0))
    assert sorted(queue.values.tolist()) == [15.0, 16.0, 17.0, 18.0]
    assert float(queue.threshold(0.5)) == pytest.approx(np.quantile([15, 16, 17, 18], 0.5))
    queue.push(torch.tensor([20.0]))  # replaces the oldest (15)
    assert sorted(queue.values.tolist()) == [16.0, 17.0, 18.0, 20.0]


def test_global_queue_select():
    queue, ref = GlobalCEQueue(50), ReferenceQueue(50)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        ce = torch.rand(2, 13, generator=g)  # any shape: pushed flattened, selected elementwise
        mask = queue.select(ce, 0.3)
        ref.push(ce.flatten())
        check_queue(queue, ref)
        assert mask.shape == ce.shape and mask.dtype == torch.bool
        thr = ref.threshold(0.3)
        sure = (ce.double() - thr).abs() > 1e-6  # away from float32 rounding of the threshold
        assert torch.equal(mask[sure], (ce.double() >= thr)[sure])


def test_global_queue_select_without_update_keeps_state():
    queue = GlobalCEQueue(8)
    queue.push(torch.arange(12.0))
    values, count = queue.values.clone(), queue.count.clone()
    ce = torch.tensor([3.0, 8.0, 9.5, 11.0, 20.0])
    mask = queue.select(ce, 0.25, update=False)
    assert torch.equal(queue.values, values) and torch.equal(queue.count, count)
    thr = np.quantile(np.arange(4.0, 12.0), 0.75)  # 9.25
    assert mask.tolist() == (ce.numpy() >= thr).tolist() == [False, False, True, True, True]


def test_global_queue_state_dict_round_trip():
    queue = GlobalCEQueue(16)
    g = torch.Generator().manual_seed(2)
    for n in (5, 9, 7):
        queue.push(torch.rand(n, generator=g))
    state = queue.state_dict()
    assert set(state) == {"values", "count"}
    restored = GlobalCEQueue(16)
    restored.load_state_dict(state)
    assert torch.equal(restored.values, queue.values) and torch.equal(restored.count, queue.count)
    ce = torch.rand(6, generator=g)  # both continue identically
    assert torch.equal(restored.select(ce, 0.4), queue.select(ce, 0.4))
    assert torch.equal(restored.values, queue.values) and torch.equal(restored.count, queue.count)


# ---- the criterion's per-token KD term, in-process (no model: logits, targets and teacher signal are given)

V, PAD = 10, 1


def criterion(**kw):
    dictionary = Dictionary()
    for i in range(V - len(dictionary)):
        dictionary.add_symbol("w%d" % i)
    task = TranslationKDTask(TranslationKDConfig(data="unused"), dictionary, dictionary)  # no data is read
    return TokenKDCriterion(task, TokenKDConfig(sentence_avg=False, label_smoothing=0.1, **kw))


def batch(seed=0):
    """Student logits, teacher logits and a padded target (B x T)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(3, 6, V, generator=g)
    teacher = 2 * torch.randn(3, 6, V, generator=g)
    target = torch.randint(4, V, (3, 6), generator=g)
    target[0, 4:] = PAD
    target[2, 2:] = PAD
    return logits, teacher, target


def reference_kd(logits, teacher, temperature):
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) in float64, per position."""
    p = F.softmax(teacher.double() / temperature, -1)
    q = F.softmax(logits.double() / temperature, -1)
    return temperature ** 2 * (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("mode", ["all", "batch", "global"])
def test_criterion_kd_per_token(mode):
    temperature, rate = 2.0, 0.4
    crit = criterion(kd_temperature=temperature, kd_select=mode, kd_select_rate=rate, kd_select_queue=20)
    crit.train()
    logits, teacher, target = batch()
    lprobs = F.log_softmax(logits, -1)
    signal = {"lprobs": F.log_softmax(teacher, -1)}
    mask = target.ne(PAD)
    ce = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
    if mode == "all":
        selected = torch.ones_like(ce, dtype=torch.bool)
    elif mode == "batch":
        selected = ce >= ce.sort(descending=True).values[exact_k(rate, ce.numel()) - 1]
    else:
        crit.ce_queue.push(torch.linspace(0, 4, 15))
        last = np.concatenate([np.linspace(0, 4, 15), ce.numpy()])[-20:]
        selected = torch.from_numpy(ce.numpy() >= np.quantile(last, 1 - rate))
    out = crit.kd_per_token(lprobs, target, signal)
    want = torch.zeros(target.shape, dtype=torch.float64)
    want[mask] = reference_kd(logits, teacher, temperature)[mask] * selected
    assert out.shape == target.shape and (out[~mask] == 0).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    if mode == "global":
        assert int(crit.ce_queue.count) == 15 + int(mask.sum())
        crit.eval()  # validation: the queue is read, not updated
        crit.kd_per_token(lprobs, target, signal)
        assert int(crit.ce_queue.count) == 15 + int(mask.sum())


def test_criterion_ignore_prefix_drops_the_first_positions():
    crit = criterion(ignore_prefix_size=2)
    logits, teacher, target = batch(seed=1)
    out = crit.kd_per_token(F.log_softmax(logits, -1), target, {"lprobs": F.log_softmax(teacher, -1)})
    want = reference_kd(logits, teacher, 1.0) * target.ne(PAD)
    want[:, :2] = 0
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_criterion_global_queue_is_saved_in_fairseq_checkpoints():
    """fairseq's Trainer.state_dict stores the criterion only if it has parameters; the queue is buffers.

    Without its queue, a resumed run starts selecting from an empty (then tiny) queue.
    """
    from fairseq.trainer import Trainer

    crit = criterion(kd_select="global", kd_select_queue=8)
    crit.ce_queue.push(torch.arange(5.0))
    trainer = SimpleNamespace(
        cfg=OmegaConf.create({"ema": {"store_ema": False}, "checkpoint": {"no_save_optimizer_state": True}}),
        model=torch.nn.Linear(1, 1), criterion=crit, get_criterion=lambda: crit, _optim_history=[],
        optimizer=object(), lr_scheduler=SimpleNamespace(state_dict=dict), get_num_updates=lambda: 0,
        task=None, cumulative_training_time=lambda: 0.0, is_fsdp=False)
    saved = dict(flatten(Trainer.state_dict(trainer)))
    keys = [k for k in saved if k.endswith("ce_queue.values")]
    assert keys, "the global CE queue is not saved with the checkpoint"
    assert torch.equal(saved[keys[0]], crit.ce_queue.values)


def flatten(state, prefix=""):
    """(dotted key, value) pairs of a nested checkpoint dict."""
    for key, value in (state or {}).items():
        if isinstance(value, dict):
            yield from flatten(value, "%s%s." % (prefix, key))
        else:
            yield prefix + str(key), value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_criterion_global_selection_under_fp16_or_bf16_training(dtype):
    """fairseq's Trainer casts the criterion with the model (--fp16: .half(), --bf16: .to(bfloat16))."""
    crit = criterion(kd_select="global", kd_select_queue=30, kd_select_rate=0.5).to(dtype=dtype)
    crit.train()
    logits, teacher, target = batch(seed=3)
    lprobs = F.log_softmax(logits, -1)
    out = crit.kd_per_token(lprobs, target, {"lprobs": F.log_softmax(teacher, -1)})
    mask = target.ne(PAD)
    ce = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask]
    selected = out[mask] > 0
    assert torch.isfinite(out).all() and int(crit.ce_queue.count) == int(mask.sum())
    assert abs(int(selected.sum()) - 0.5 * ce.numel()) <= 1  # the upper half of the batch's own CEs
    assert ce[selected].min() >= ce[~selected].max()


def test_criterion_global_selection_in_eval_before_any_training_step():
    """fairseq-validate / a first validation before any update: an empty queue must not crash."""
    crit = criterion(kd_select="global", kd_select_queue=8)
    crit.eval()
    logits, teacher, target = batch(seed=2)
    out = crit.kd_per_token(F.log_softmax(logits, -1), target, {"lprobs": F.log_softmax(teacher, -1)})
    assert torch.isfinite(out).all()
