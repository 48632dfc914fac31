"""hybrid_kd --kd-mix rules (kd_plugin.mixing): weights and loss against float64 references, the w = 0 / w = 1
limits, the teacher's signal on its own targets from the cache equal to the online one, a real training run
from the cache that decodes with stock fairseq-generate, and refusals."""
import copy
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_ARCH, TRAIN_COMMON, USER_DIR, kd_train, last_valid, load_state, run
from inproc import build, criterion_loss, first_batch
from test_half_precision import HALF, TOL, train_step
from test_teacher_cache import one_thread

from kd_plugin import mixing
from kd_plugin.checks import KDConfigError
from kd_plugin.cli import dump_teacher
from kd_plugin.signals import topk_signal

K = 8


# ---------------------------------------------------------------------------------------- pure weights


def hand_batch(seed=0, bsz=3, tgt_len=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(bsz, tgt_len, vocab, generator=g, dtype=torch.float64) * 2, -1)
    target = torch.randint(3, vocab, (bsz, tgt_len), generator=g)
    mask = torch.ones(bsz, tgt_len, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 4:] = False
    return lp, target, mask


def ref_token_p(lp, target, k):
    """float64 p(y_t): the token's own probability, or (top-K) the rest mass when y_t is outside the K ids."""
    p = lp.exp()
    own = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if not k:
        return own
    top = p.topk(k, -1)
    inside = top.indices.eq(target.unsqueeze(-1)).any(-1)
    return torch.where(inside, own, 1 - top.values.sum(-1))


def ref_entropy(lp, k):
    p = lp.exp()
    if k:
        top = p.topk(k, -1).values
        p = torch.cat([top, (1 - top.sum(-1)).unsqueeze(-1)], -1)
    return -(p * p.log()).sum(-1)


@pytest.mark.parametrize("k", [0, 3])
def test_rule_weights_equal_float64_references(k):
    lp, target, mask = hand_batch()
    teacher = topk_signal(lp.float(), k) if k else {"lprobs": lp.float()}
    if k:  # the hand batch has targets inside and outside the top-3 (the rest-bin case is exercised)
        inside = teacher["topk_ids"].eq(target.unsqueeze(-1)).any(-1)[mask]
        assert inside.any() and (~inside).any()
    student = torch.log_softmax(torch.randn(lp.shape, dtype=torch.float64), -1).gather(
        -1, target.unsqueeze(-1)).squeeze(-1)
    args = dict(mask=mask, teacher=teacher, target=target, student_lprob=student.float(), vocab_size=lp.size(-1),
                num_updates=30, alpha=0.3, start=0.2, end=0.9, ramp=100)
    m = mask.double()
    p_y = ref_token_p(lp, target, k)
    want = {
        "word": 0.3 * m,
        "confidence": (1 - p_y) * m,
        "entropy": ref_entropy(lp, k) / math.log(lp.size(-1)) * m,
        "curriculum": (0.2 + 0.7 * 0.3) * m,
    }
    n = m.sum(1)
    student_ll, teacher_ll = (student * m).sum(1) / n, (p_y.log() * m).sum(1) / n
    want["hkd"] = (student_ll > teacher_ll).double().unsqueeze(1) * m
    for name, rule in mixing.MIX_RULES.items():
        got = rule(**args)
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got.double(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    # hkd: a student more confident than the teacher on a sentence learns from p there, else from y^
    lifted = rule_hkd_split(args, teacher_ll)
    assert lifted[0].all() and not lifted[1].any()


def rule_hkd_split(args, teacher_ll):
    """hkd weights with sentence 0's student log-likelihood just above the teacher's and sentence 1's just below."""
    student = args["student_lprob"].clone()
    mask = args["mask"]
    for b, delta in ((0, 1e-3), (1, -1e-3)):
        student[b][mask[b]] = float(teacher_ll[b]) + delta
    w = mixing.hkd(**dict(args, student_lprob=student))
    return [w[b][mask[b]].bool() for b in (0, 1)]


def test_curriculum_schedule_is_linear_then_flat():
    assert [mixing.schedule(u, 0.1, 0.9, 200) for u in (0, 50, 200, 1000)] == pytest.approx([0.1, 0.3, 0.9, 0.9])
    assert mixing.schedule(0, 0.1, 0.9, 0) == 0.9
    assert mixing.schedule(100, 0.8, 0.2, 400) == pytest.approx(0.65)  # token- to sentence-heavy works too


# ------------------------------------------------------------------------------- criterion, in process


def _build(data_bin, teacher, teacher_targets, *extra, criterion="hybrid_kd"):
    return build(data_bin, "--task", "translation_kd", "--criterion", criterion, "--teacher-path", teacher,
                 "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", "--dropout", "0", *extra)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_word_weight_zero_equals_sentence_kd(data_bin, teacher, teacher_targets):
    """--kd-mix word --kd-alpha 0: value, sample size and gradient of sentence_kd on the same batch."""
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, "--kd-mix", "word", "--kd-alpha", "0")
    _, _, _, ref = _build(data_bin, teacher, teacher_targets, criterion="sentence_kd")
    sample = first_batch(task)
    loss, size, log = criterion_loss(task, model, crit, sample, train=True)
    got = grads(model, loss)
    ref_loss, ref_size, ref_log = criterion_loss(task, model, ref, sample, train=True)
    want = grads(model, ref_loss)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and size == ref_size
    assert log["nll_loss"].item() == pytest.approx(ref_log["nll_loss"].item(), rel=1e-6)
    assert log["mix_weight"] == 0 and log["kd_loss"] > 0
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert crit.teacher_signals == ("logits_on_targets", "targets") and not list(crit.parameters())


def kd_reference(model, sample, teacher_model, temperature, topk=0):
    """float64 sum over y^ tokens of T^2 KL(p_T || q_T), p the teacher on its own prefix (full vocabulary, or
    the K+1 bins of kd_plugin.signals: the teacher's K ids and the rest mass, the student's full softmax at
    the ids), with autograd through a float64 copy of the student."""
    double = copy.deepcopy(model).double()
    net_input = dict(sample["net_input"], prev_output_tokens=sample["teacher_net_input"]["prev_output_tokens"])
    with torch.no_grad():
        lp = torch.log_softmax(teacher_model(**net_input)[0].double(), -1)
    lq = torch.log_softmax(double(**net_input)[0].double(), -1)
    mask = sample["teacher_target"].ne(1)
    lp, lq = lp[mask], lq[mask]
    if topk:
        ids = lp.topk(topk, -1).indices
        lp, lq = lp.gather(-1, ids), lq.gather(-1, ids)
        lp = torch.cat([lp, torch.log1p(-lp.exp().sum(-1, keepdim=True))], -1)
        lq = torch.cat([lq, torch.log1p(-lq.exp().sum(-1, keepdim=True))], -1)
    lp, lq = torch.log_softmax(lp / temperature, -1), torch.log_softmax(lq / temperature, -1)
    kd = temperature ** 2 * (lp.exp() * (lp - lq)).sum()
    kd.backward()
    return kd.item(), {n: p.grad for n, p in double.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("topk", [0, K])
def test_word_weight_one_is_word_kd_on_the_teacher_prefix(data_bin, teacher, teacher_targets, topk):
    """--kd-alpha 1: T^2 KL(p_T || q_T) over y^, p the teacher on y^_<t (online), value and gradient vs float64."""
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, "--kd-mix", "word", "--kd-alpha", "1",
                                  "--kd-temperature", "2", "--kd-topk", topk)
    sample = first_batch(task)
    loss, size, log = criterion_loss(task, model, crit, sample, train=True)
    got = grads(model, loss)
    want, want_grads = kd_reference(model, sample, task.teacher.models[0], 2.0, topk)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert size == sample["teacher_target"].ne(1).sum().item() and log["mix_weight"] == size
    scale = max(w.abs().max().item() for w in want_grads.values())  # k_proj.bias: ~0 in exact arithmetic
    for name, w in want_grads.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("rule", ["confidence", "entropy", "hkd", "curriculum"])
def test_rule_loss_equals_float64_mix(data_bin, teacher, teacher_targets, rule):
    """loss = sum_t (1 - w_t) LS-NLL(y^_t) + w_t KL(p || q), with w_t from the rule, recomputed in float64."""
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, "--kd-mix", rule, "--kd-mix-start", "0.2",
                                  "--kd-mix-end", "0.8", "--kd-mix-ramp", "10")
    crit.set_num_updates(5)
    sample = first_batch(task)
    loss, _, log = criterion_loss(task, model, crit, sample)
    teacher_signal = sample_with_signal(task, model, crit, sample)[mixing.TEACHER_ON_TARGETS]
    net_input = dict(sample["net_input"], prev_output_tokens=sample["teacher_net_input"]["prev_output_tokens"])
    with torch.no_grad():
        lq = torch.log_softmax(model(**net_input)[0].double(), -1)
    target = sample["teacher_target"]
    mask = target.ne(1)
    lp = teacher_signal["lprobs"].double()
    student = lq.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = mixing.get_rule(rule)(mask=mask, teacher=teacher_signal, target=target, student_lprob=student,
                              vocab_size=lq.size(-1), num_updates=5, alpha=0.5, start=0.2, end=0.8, ramp=10).double()
    if rule == "hkd":  # 0 or 1 per sentence
        assert set(w[mask].unique().tolist()) <= {0.0, 1.0}
    else:
        assert 0 < w[mask].mean() < 1 and (rule == "curriculum" or w[mask].std() > 0.01)
    kd = (lp.exp() * (lp - lq)).sum(-1)
    eps = 0.1
    ls = (1 - eps) * -student + eps / (lq.size(-1) - 1) * (-lq.sum(-1) + student)
    want = (((1 - w) * ls + w * kd) * mask).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert log["mix_weight"] == pytest.approx(w[mask].sum().item(), rel=1e-5)
    if rule == "curriculum":
        assert w[mask].unique().tolist() == pytest.approx([0.5])


def sample_with_signal(task, model, crit, sample):
    sample = dict(sample)
    task.add_teacher_signal(sample, model, crit)
    return sample


@pytest.mark.parametrize("flags,message", [
    (["--kd-mix", "curriculum", "--kd-mix-start", "1.5"], "--kd-mix-start must be in [0, 1]"),
    (["--kd-mix", "curriculum", "--kd-mix-end", "-0.1"], "--kd-mix-end must be in [0, 1]"),
    (["--kd-mix", "curriculum", "--kd-mix-ramp", "-1"], "--kd-mix-ramp must be in [0, inf]"),
    (["--kd-mix", "word", "--kd-gold-weight", "0.5"], "--kd-gold-weight needs --kd-mix gate"),
])
def test_rule_flags_out_of_range_are_refused(data_bin, teacher, teacher_targets, flags, message):
    with pytest.raises(KDConfigError, match=message.replace("[", r"\[")):
        _build(data_bin, teacher, teacher_targets, *flags)


# ------------------------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def prefix_cache(tmp_path_factory, data_bin, teacher, teacher_targets):
    """Top-8 on the teacher-decoded train and valid targets (kd-dump-teacher --targets), in process."""
    out = str(tmp_path_factory.mktemp("prefix_cache") / "cache")
    for split in ("train", "valid"):
        with one_thread():
            dump_teacher.cli_main(["--data", data_bin, "--path", teacher, "--split", split, "--out", out,
                                   "--topk", str(K), "--max-tokens", "4000", "--targets", teacher_targets])
    return out


def test_cached_signal_on_teacher_prefix_equals_online(data_bin, teacher, teacher_targets, prefix_cache):
    """The cache's sample["teacher_on_targets"] = the online teacher's top-8 on y^ (fp16), aligned with y^."""
    flags = ["--kd-mix", "word", "--kd-topk", K]
    _, task, model, crit = _build(data_bin, teacher, teacher_targets, *flags)
    _, cached_task, _, cached_crit = build(data_bin, "--task", "translation_kd", "--criterion", "hybrid_kd",
                                           "--teacher-cache", prefix_cache, "--teacher-targets", teacher_targets,
                                           "--label-smoothing", "0.1", "--dropout", "0", *flags)
    assert cached_task.teacher is None
    header = dump_teacher.read_header(os.path.join(prefix_cache, "valid.topk_on_targets"))
    assert header["targets"] == "teacher" and header["num_tokens"] > header["count"] == 100
    sample = first_batch(cached_task)
    cached = sample[mixing.TEACHER_ON_TARGETS]
    assert cached["topk_lprobs"].dtype == torch.float16
    assert cached["topk_ids"].shape[:2] == sample["teacher_target"].shape
    with torch.no_grad():
        online = sample_with_signal(task, model, crit, {k: v for k, v in sample.items()
                                                        if k != mixing.TEACHER_ON_TARGETS})[mixing.TEACHER_ON_TARGETS]
    mask = sample["teacher_target"].ne(1)
    assert torch.equal(cached["topk_ids"][mask], online["topk_ids"][mask])
    torch.testing.assert_close(cached["topk_lprobs"][mask].float(), online["topk_lprobs"][mask], rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(cached["topk_rest"][mask].float(), online["topk_rest"][mask].clamp(min=-65504),
                               rtol=2e-3, atol=2e-3)
    # and the loss: same student, cached vs online signal
    cached_loss, _, _ = criterion_loss(cached_task, model, cached_crit, sample)
    online_loss, _, _ = criterion_loss(task, model, crit, {k: v for k, v in sample.items()
                                                           if k != mixing.TEACHER_ON_TARGETS})
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=2e-3)


def test_word_rule_trains_from_the_cache_and_decodes_with_stock_fairseq(data_bin, teacher_targets, prefix_cache,
                                                                        tmp_path):
    save = str(tmp_path / "word")
    log = kd_train(data_bin, save, "--criterion", "hybrid_kd", "--kd-mix", "word", "--teacher-cache",
                   prefix_cache, "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", max_update=40)
    assert "mix_weight" in log and math.isfinite(last_valid(log))
    state = load_state(save + "/checkpoint_last.pt")
    assert not state.get("criterion") and not any(k.startswith("teacher") for k in state["model"])
    out = run("fairseq-generate", data_bin, "--path", save + "/checkpoint_last.pt", "--gen-subset", "valid",
              "--beam", "2", "--batch-size", "64")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100


def test_gold_cache_or_other_targets_are_refused(data_bin, teacher, teacher_targets, prefix_cache, tmp_path):
    # a directory with the gold-target cache only: one line naming the missing store, exit status != 0
    gold = str(tmp_path / "gold")
    with one_thread():
        dump_teacher.cli_main(["--data", data_bin, "--path", teacher, "--split", "valid", "--out", gold,
                               "--topk", str(K), "--max-tokens", "4000"])
        dump_teacher.cli_main(["--data", data_bin, "--path", teacher, "--split", "train", "--out", gold,
                               "--topk", str(K), "--max-tokens", "4000"])
    log = run("fairseq-train", data_bin, "--save-dir", str(tmp_path / "s"), *TINY_ARCH, *TRAIN_COMMON,
              "--max-update", 1, "--user-dir", USER_DIR, "--task", "translation_kd", "--criterion", "hybrid_kd",
              "--kd-mix", "word", "--teacher-cache", gold, "--teacher-targets", teacher_targets, expect_ok=False)
    last = log.strip().splitlines()[-1]
    assert re.match(r"^(kd_plugin\.checks\.KDConfigError|fairseq-train: error): --teacher-cache: %s/" % re.escape(gold),
                    last), last
    assert "topk_on_targets.json not found (it holds a cache on the gold targets" in last
    assert "kd-dump-teacher --targets" in last and not os.path.exists(str(tmp_path / "s/checkpoint_last.pt"))

    # other teacher-decoded targets of the same lengths (one token changed): the md5 differs
    other = str(tmp_path / "other")
    shutil.copytree(teacher_targets, other)
    bin_file = os.path.join(other, "valid.src-tgt.tgt.bin")
    tokens = np.fromfile(bin_file, dtype=np.uint16)
    tokens[0] = 4 if tokens[0] != 4 else 5
    tokens.tofile(bin_file)
    _, task, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "hybrid_kd", "--kd-mix", "word",
                          "--teacher-cache", prefix_cache, "--teacher-targets", other)
    with pytest.raises(KDConfigError, match=r"valid.topk_on_targets.json was dumped on other teacher-decoded targets"):
        task.load_dataset("valid")

    # a store dumped on the teacher's targets, renamed to pose as a gold one: its header says so
    fake = str(tmp_path / "fake")
    os.makedirs(fake)
    for name in os.listdir(prefix_cache):
        if name.startswith("valid.topk_on_targets"):
            shutil.copy(os.path.join(prefix_cache, name), os.path.join(fake, name.replace("topk_on_targets", "topk")))
    _, task, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd", "--teacher-cache", fake)
    with pytest.raises(KDConfigError, match="was dumped on the teacher targets, not the gold ones"):
        task.load_dataset("valid")


def test_sharded_dump_on_targets_merges_byte_identical(data_bin, teacher, teacher_targets, tmp_path):
    """kd-dump-teacher --targets with 2 shards + merge --on-targets = one unsharded --targets dump, byte for byte."""
    flags = ["--data", data_bin, "--path", teacher, "--split", "valid", "--topk", str(K), "--max-tokens", "4000",
             "--block-size", "32", "--targets", teacher_targets]
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    with one_thread():
        dump_teacher.cli_main(flags + ["--out", whole])
        for i in range(2):
            dump_teacher.cli_main(flags + ["--out", sharded, "--num-shards", "2", "--shard-id", str(i)])
    dump_teacher.cli_main(["merge", "--out", sharded, "--split", "valid", "--on-targets"])
    names = sorted(n for n in os.listdir(whole) if n.startswith("valid.topk_on_targets."))
    assert len(names) == 5 and sorted(n for n in os.listdir(sharded) if n.startswith("valid.")) == names
    for name in names:
        assert open(os.path.join(whole, name), "rb").read() == open(os.path.join(sharded, name), "rb").read(), name


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("source", ["online", "cache"])
def test_rules_under_half_precision_close_to_fp32(data_bin, teacher, teacher_targets, prefix_cache, source, half):
    """As the Trainer runs --fp16/--bf16 (kd_plugin tests/test_half_precision.py): the teacher's signal on its
    targets reaches the criterion float32 (online) or float16 as stored (cache); loss and gradient near fp32."""
    where = ["--teacher-path", teacher] if source == "online" else ["--teacher-cache", prefix_cache]
    cfg, task, model, crit = build(data_bin, "--task", "translation_kd", "--criterion", "hybrid_kd", "--kd-mix",
                                   "confidence", "--teacher-targets", teacher_targets, "--label-smoothing", "0.1",
                                   "--dropout", "0", *where)
    sample = first_batch(task, "train")
    half_model, half_crit = copy.deepcopy(model), task.build_criterion(cfg.criterion)
    loss, grad, _ = train_step(task, model, crit, sample)
    if task.teacher:
        task.teacher._follow(next(model.parameters()).to(HALF[half]))
    seen = {}
    forward = half_crit.rule_forward
    half_crit.rule_forward = lambda m, s: seen.setdefault("signal", s[mixing.TEACHER_ON_TARGETS]) and forward(m, s)
    h_loss, h_grad, log = train_step(task, half_model, half_crit, sample, HALF[half])
    assert seen["signal"]["lprobs" if source == "online" else "topk_lprobs"].dtype == (
        torch.float32 if source == "online" else torch.float16)
    loss_tol, grad_tol = TOL[half]
    assert abs(h_loss - loss) / loss < loss_tol, (h_loss, loss)
    assert ((h_grad - grad).norm() / grad.norm()) < grad_tol
    if task.teacher:
        task.teacher._follow(next(model.parameters()))
