"""on_policy_kd: share 0 is token_kd exactly; the prefixes are the student's own (greedy: fairseq-generate's
beam-1 output), scored by the teacher as a direct forward would; the loss equals a float64 reference on gold and
on-policy rows; generation runs without gradient in eval mode and the one training pass goes through model(...);
the row choice and sampling are seeded and leave the caller's RNG alone; the fine-tuning recipe (--restore-file
from a token_kd student) trains and its student decodes with stock fairseq-generate."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.data import data_utils

from conftest import TEACHER_ARCH
from helpers import kd_train, load_state, run
from inproc import build, first_batch

from kd_plugin.needs import ON_POLICY, OnPolicy, TeacherNeeds
from kd_plugin.on_policy import choose_rows, generate

MAX_LEN = ("--on-policy-max-len-a", "1.2", "--on-policy-max-len-b", "10")


def _build(data_bin, teacher, *extra, arch=None):
    kw = {"arch": arch} if arch else {}
    return build(data_bin, "--task", "translation_kd", "--teacher-path", teacher, "--label-smoothing", "0.1",
                 "--dropout", "0", *extra, **kw)


def on_policy(data_bin, teacher, *extra, student=None):
    """(task, model, criterion) of on_policy_kd; ``student``: a checkpoint (the teacher's architecture) whose
    weights the student takes, so that its outputs are translations rather than a random model's."""
    _, task, model, crit = _build(data_bin, teacher, "--criterion", "on_policy_kd", *MAX_LEN, *extra,
                                  arch=TEACHER_ARCH if student else None)
    if student:
        model.load_state_dict(load_state(student)["model"])
    return task, model, crit


def prepared(task, model, sample, update):
    """What translation_kd's train_step hands the criterion: student prefixes, then the teacher's signal."""
    sample = task.add_student_prefixes(sample, model, update)
    task.add_teacher_signal(sample, model)
    return sample


def test_share_zero_is_token_kd_exactly(data_bin, teacher):
    task, model, crit = on_policy(data_bin, teacher, "--on-policy-share", "0", "--kd-alpha", "0.3")
    _, _, _, token = _build(data_bin, teacher, "--criterion", "token_kd", "--kd-alpha", "0.3")
    sample = first_batch(task, "train")
    model.train()
    mixed = prepared(task, model, sample, update=3)
    assert not mixed[ON_POLICY].any() and mixed["net_input"] is sample["net_input"]
    results = []
    for criterion in (crit, token):
        model.zero_grad()
        loss, size, log = criterion(model, dict(mixed))
        loss.backward()
        results.append((loss, size, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (a, size_a, grad_a), (b, size_b, grad_b) = results
    assert torch.equal(a, b) and size_a == size_b and torch.equal(grad_a, grad_b)


def test_declared_needs_and_the_keys_served(data_bin, teacher):
    """The task reads on_policy_kd's TeacherNeeds once and serves exactly them: in training the teacher's signal
    and the on-policy rows, in validation (gold prefixes) the teacher's signal alone."""
    task, model, crit = on_policy(data_bin, teacher, "--on-policy-share", "0.5", "--on-policy-temperature", "0.7")
    want = TeacherNeeds(logits=True, topk=0, on_policy=OnPolicy(0.5, 0.7, 1.2, 10))
    assert crit.teacher_needs == want and task.needs.needs == want
    sample = first_batch(task, "train")
    signals = {"teacher", "teacher_target", "teacher_net_input", ON_POLICY}
    assert signals & set(prepared(task, model, sample, update=1)) == {"teacher", ON_POLICY}
    valid = dict(first_batch(task, "valid"))
    _, _, log = task.valid_step(valid, model, crit)  # adds the teacher's signal to ``valid`` in place
    assert signals & set(valid) == {"teacher"} and "on_policy_sentences" not in log


def test_greedy_prefixes_are_fairseq_generate_beam_1_output(data_bin, teacher):
    """The student (here: the trained toy teacher's weights) at share 1, temperature 0: every row's target is
    what stock fairseq-generate --beam 1 outputs for that sentence with the same length cap."""
    task, model, _ = on_policy(data_bin, teacher, "--on-policy-share", "1", "--on-policy-temperature", "0",
                               student=teacher)
    sample = first_batch(task, "valid")
    mixed = task.add_student_prefixes(sample, model, 0)
    assert mixed[ON_POLICY].all()
    out = run("fairseq-generate", data_bin, "--path", teacher, "--gen-subset", "valid", "--beam", "1",
              "--max-len-a", "1.2", "--max-len-b", "10", "--batch-size", "64")
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", out, re.M)}
    pad = task.tgt_dict.pad()
    ours = {int(i): task.tgt_dict.string(t[t.ne(pad)]) for i, t in zip(mixed["id"], mixed["target"])}
    assert len(ours) == len(sample["id"]) > 10
    assert ours == {i: hyps[i] for i in ours}
    gold = {int(i): task.tgt_dict.string(t[t.ne(pad)]) for i, t in zip(sample["id"], sample["target"])}
    assert ours != gold  # the test would notice gold prefixes
    # prev_output_tokens: EOS, then the output without its final EOS
    eos = task.tgt_dict.eos()
    for tgt, prev in zip(mixed["target"], mixed["net_input"]["prev_output_tokens"]):
        n = int(tgt.ne(pad).sum())
        assert tgt[n - 1] == eos and prev[0] == eos and torch.equal(prev[1:n], tgt[:n - 1])


@pytest.mark.parametrize("temperature", ["1", "2"])
def test_loss_equals_float64_reference_and_teacher_scores_the_student_prefixes(data_bin, teacher, temperature):
    """Share 0.5, sampled prefixes, KD temperature T: gold rows carry (1 - alpha) LS-NLL + alpha T^2 KL, on-policy
    rows T^2 KL alone, each KL between the teacher's and the student's tempered distributions on that row's prefix;
    the teacher's signal equals a direct forward of the teacher checkpoint (loaded here on its own)."""
    alpha = 0.3
    task, model, crit = on_policy(data_bin, teacher, "--on-policy-share", "0.5", "--on-policy-temperature", "1",
                                  "--kd-alpha", str(alpha), "--kd-temperature", temperature)
    model.eval()
    sample = first_batch(task, "train")
    mixed = prepared(task, model, sample, update=7)
    rows = mixed[ON_POLICY]
    assert rows.any() and (~rows).any()
    assert not torch.equal(mixed["target"][rows][:, :4], sample["target"][rows][:, :4])  # not the gold

    [direct], _ = checkpoint_utils.load_model_ensemble([teacher], task=task)
    direct.eval()
    with torch.no_grad():
        t_logits = direct(**mixed["net_input"])[0].double()
    torch.testing.assert_close(mixed["teacher"]["lprobs"].double(), F.log_softmax(t_logits, -1), rtol=0, atol=1e-5)

    loss, size, log = crit(model, dict(mixed))
    s_logits = model(**mixed["net_input"])[0].double()
    t = float(temperature)
    target, pad = mixed["target"], task.tgt_dict.pad()
    mask = target.ne(pad)
    lp, lq = F.log_softmax(t_logits / t, -1), F.log_softmax(s_logits / t, -1)
    kl = t * t * (lp.exp() * (lp - lq)).sum(-1) * mask
    ls, nll = label_smoothed_nll_loss(F.log_softmax(s_logits, -1).view(-1, lq.size(-1)), target.view(-1), 0.1,
                                      ignore_index=pad, reduce=False)
    ls, nll = ls.view(target.shape).sum(1), nll.view(target.shape).sum(1)
    want = torch.where(rows, kl.sum(1), (1 - alpha) * ls + alpha * kl.sum(1)).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert size == mixed["ntokens"] == int(mask.sum())
    assert log["nll_loss"].item() == pytest.approx(nll[~rows].sum().item(), rel=1e-5)
    assert log["gold_ntokens"] == int(mask[~rows].sum()) and log["on_policy_sentences"] == int(rows.sum())


def test_generation_is_gradient_free_in_eval_mode_and_training_goes_through_model(data_bin, teacher):
    task, model, crit = on_policy(data_bin, teacher, "--on-policy-share", "1", "--on-policy-temperature", "1")
    calls = []  # the output projection runs once per decoding step (fairseq's generator calls decoder.forward)
    model.decoder.output_projection.register_forward_hook(
        lambda m, a, o: calls.append((torch.is_grad_enabled(), m.training)))
    forwards = []
    model.register_forward_hook(lambda m, a, o: forwards.append(torch.is_grad_enabled()))
    model.train()
    mixed = prepared(task, model, first_batch(task, "train"), update=1)
    assert model.training  # restored after generation
    assert len(calls) > 3 and all(c == (False, False) for c in calls)
    assert forwards == []  # generation never calls the (possibly DDP-wrapped) model's forward
    calls.clear()
    loss, _, _ = crit(model, mixed)
    assert calls == [(True, True)] and forwards == [True]  # the one training pass, through model(...)
    for key in ("target", ON_POLICY):
        assert not mixed[key].requires_grad
    loss.backward()
    assert all(p.grad is None for m in task.teacher.models for p in m.parameters())


def test_row_choice_has_the_share_and_ignores_batch_splits():
    ids = torch.arange(10000)
    rows = choose_rows(ids, 0.3, seed=1, update=5)
    assert abs(rows.float().mean().item() - 0.3) < 0.015  # 3 binomial standard deviations
    split = torch.cat([choose_rows(ids[:3333], 0.3, 1, 5), choose_rows(ids[3333:], 0.3, 1, 5)])
    assert torch.equal(rows, split)
    other = choose_rows(ids, 0.3, seed=1, update=6)
    assert 0.05 < (rows & other).float().mean().item() < 0.13  # independent draws: 0.09 expected
    assert not choose_rows(ids, 0.0, 1, 5).any() and choose_rows(ids, 1.0, 1, 5).all()


def test_metrics_count_gold_rows_only_and_share_one_logs_no_nan():
    """nll_loss is per gold-row token (on-policy rows have none); an update with no gold row (share 1) logs its
    loss and kd_loss but no nll_loss or ppl, rather than 0 / 0 = nan."""
    from fairseq import metrics
    from kd_plugin.criterions.on_policy_kd import OnPolicyKDCriterion

    def reduced(*logs):
        with metrics.aggregate() as agg:
            OnPolicyKDCriterion.reduce_metrics(list(logs))
        return agg.get_smoothed_values()

    log = {"loss": torch.tensor(6.0), "nll_loss": torch.tensor(2.0), "kd_loss": torch.tensor(3.0),
           "ntokens": 12, "sample_size": 12, "nsentences": 3, "gold_ntokens": 4, "on_policy_sentences": 2}
    mixed = reduced(log)
    ln2 = np.log(2)
    assert mixed["nll_loss"] == pytest.approx(round(2.0 / 4 / ln2, 3))  # per gold token, not per token
    assert mixed["loss"] == pytest.approx(round(6.0 / 12 / ln2, 3))
    assert mixed["on_policy_share"] == pytest.approx(round(2 / 3, 3))
    only = reduced(dict(log, nll_loss=torch.tensor(0.0), gold_ntokens=0, on_policy_sentences=3))
    assert "nll_loss" not in only and "ppl" not in only
    assert only["loss"] == pytest.approx(round(6.0 / 12 / ln2, 3))
    assert only["kd_loss"] == pytest.approx(round(3.0 / 12 / ln2, 3))
    assert all(np.isfinite(v) for v in only.values())


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(data_bin, teacher):
    task, model, _ = on_policy(data_bin, teacher, student=teacher)
    net = first_batch(task, "valid")["net_input"]

    def decode(temperature, seed):
        return generate(model, task.tgt_dict, net["src_tokens"], net["src_lengths"], temperature, 1.2, 10, seed)

    torch.manual_seed(123)
    a = decode(1.0, seed=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG state is restored
    same, other, greedy = decode(1.0, seed=5), decode(1.0, seed=6), decode(0.0, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, same))
    assert sum(not torch.equal(x, y) for x, y in zip(a, other)) > 5
    assert sum(not torch.equal(x, y) for x, y in zip(a, greedy)) > 5
    assert all(torch.equal(x, y) for x, y in zip(greedy, decode(0.0, seed=99)))  # greedy ignores the seed


def on_policy_kl(task, model, teacher_model, sample):
    """Sum over the batch of KL(teacher || student) on the student's own greedy outputs."""
    net = sample["net_input"]
    with torch.no_grad():
        outs = generate(model, task.tgt_dict, net["src_tokens"], net["src_lengths"], 0.0, 1.2, 10)
        pad, eos = task.tgt_dict.pad(), task.tgt_dict.eos()
        tgt = data_utils.collate_tokens(outs, pad, eos)
        prev = data_utils.collate_tokens(outs, pad, eos, move_eos_to_beginning=True)
        inp = dict(net, prev_output_tokens=prev)
        lp = F.log_softmax(teacher_model(**inp)[0].double(), -1)
        lq = F.log_softmax(model(**inp)[0].double(), -1)
        return ((lp.exp() * (lp - lq)).sum(-1) * tgt.ne(pad)).sum().item() / int(tgt.ne(pad).sum())


def test_fine_tuning_recipe_from_a_token_kd_student(data_bin, teacher, tmp_path):
    """README's recipe: a token_kd student, then N on-policy updates from it (--restore-file, optimizer, scheduler,
    meters and data loader reset). It trains N updates with the student's prefixes (logged share), lowers the KL to
    the teacher on the student's own outputs, and decodes with stock fairseq-generate."""
    n = 50
    start = str(tmp_path / "token")
    kd_train(data_bin, start, "--criterion", "token_kd", "--teacher-path", teacher, "--label-smoothing", "0.1",
             "--kd-alpha", "0.5", max_update=60)
    tuned = str(tmp_path / "on_policy")
    # the stage at the toy's own learning rate (TRAIN_COMMON's 5e-3) with its seed fixed, so that the effect is
    # far from the bound below (30 updates at lr 1e-3 gave 0.90x, and 0.92x with seeds 2 and 3)
    log = kd_train(data_bin, tuned, "--criterion", "on_policy_kd", "--teacher-path", teacher, "--label-smoothing",
                   "0.1", "--kd-alpha", "0.5", "--kd-temperature", "1", "--kd-divergence", "forward_kl",
                   "--on-policy-share", "1", "--on-policy-temperature", "1", *MAX_LEN,
                   "--restore-file", os.path.join(start, "checkpoint_last.pt"), "--reset-optimizer",
                   "--reset-lr-scheduler", "--reset-meters", "--reset-dataloader", "--lr", "5e-3", "--seed", "1",
                   "--log-interval", "5", max_update=n)
    assert "Loaded checkpoint %s (epoch" % os.path.join(start, "checkpoint_last.pt") in log
    updates = [int(m) for m in re.findall(r"num_updates (\d+)", log)]
    assert updates and max(updates) == n  # counted from 0: the optimizer's step count was reset
    shares = [float(m) for m in re.findall(r"on_policy_share ([\d.]+)", log)]
    assert shares and all(s == 1.0 for s in shares)
    assert not re.search(r"\b(nll_loss|ppl)[= ]nan\b", log)  # no gold rows at share 1: no 0 / 0 in the log
    ckpt = os.path.join(tuned, "checkpoint_last.pt")
    out = run("fairseq-generate", data_bin, "--path", ckpt, "--gen-subset", "valid", "--beam", "5")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100

    # the criterion's objective, measured independently: KL to the teacher on the student's own outputs
    task, model, _ = on_policy(data_bin, teacher)
    [teacher_model], _ = checkpoint_utils.load_model_ensemble([teacher], task=task)
    teacher_model.eval()
    sample = first_batch(task, "valid", max_tokens=4000)
    kls = []
    for path in (os.path.join(start, "checkpoint_last.pt"), ckpt):
        model.load_state_dict(load_state(path)["model"])
        model.eval()
        kls.append(on_policy_kl(task, model, teacher_model, sample))
    # measured: 1.853 -> 1.335 nats/token (0.72x; seed 5: 0.76x). Not compared with token_kd: the same updates of
    # token_kd from the same checkpoint lower it about as much on this toy (30 at lr 5e-3: 0.82-0.88x vs 0.82-0.83x)
    assert kls[1] < 0.9 * kls[0], kls
    assert np.isfinite(kls).all()


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_half_precision_as_the_trainer_runs_it(data_bin, teacher, half):
    """The Trainer halves model and criterion and casts the sample, then train_step generates and the teacher
    scores: the half student's own greedy prefixes are the float32 student's, the teacher's signal float32, and
    loss and gradient within test_half_precision's tolerances of float32."""
    import copy

    from inproc import cast_sample
    from test_half_precision import HALF, TOL

    cfg, task, model, crit = _build(data_bin, teacher, "--criterion", "on_policy_kd", *MAX_LEN, "--on-policy-share",
                                    "0.5", "--on-policy-temperature", "0", arch=TEACHER_ARCH)
    model.load_state_dict(load_state(teacher)["model"])
    sample = first_batch(task, "train")
    results = []
    for dtype in (None, HALF[half]):
        m, c, s = (model, crit, sample) if dtype is None else \
            (copy.deepcopy(model).to(dtype), task.build_criterion(cfg.criterion).to(dtype), cast_sample(sample, dtype))
        m.train()
        mixed = prepared(task, m, s, update=2)
        assert mixed["teacher"]["lprobs"].dtype == torch.float32
        loss, _, _ = c(m, mixed)
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
        results.append((mixed, loss.float(), grad))
    (ref, loss, grad), (got, h_loss, h_grad) = results
    assert ref[ON_POLICY].any() and torch.equal(ref["target"], got["target"])
    loss_tol, grad_tol = TOL[half]
    assert abs(h_loss - loss) / loss < loss_tol, (h_loss, loss)
    assert (h_grad - grad).norm() / grad.norm() < grad_tol
