"""token_kd: exactness against fairseq's criterion, real training runs, stock decoding of the student."""
import os

import pytest
import torch

from conftest import TEACHER_ARCH
from helpers import kd_train, last_valid, load_state, run, train
from inproc import build, criterion_loss, first_batch


def _pair(data_bin, teacher, *kd_args):
    """token_kd and a stock label_smoothed_cross_entropy criterion on the same student weights."""
    _, task, model, crit = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                 "--teacher-path", teacher, "--label-smoothing", "0.1", *kd_args)
    _, _, ref_model, ref = build(data_bin, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
    ref_model.load_state_dict(model.state_dict())
    return task, model, crit, ref_model, ref


def test_alpha_zero_is_fairseq_label_smoothed_ce_exactly(data_bin, teacher):
    task, model, crit, ref_model, ref = _pair(data_bin, teacher, "--kd-alpha", "0")
    sample = first_batch(task)
    for train_mode in (False, True):
        torch.manual_seed(3)
        loss, size, log = criterion_loss(task, model, crit, sample, train=train_mode)
        torch.manual_seed(3)
        ref_model.train(train_mode)
        ref_loss, ref_size, ref_log = ref(ref_model, sample)
        assert loss.item() == ref_loss.item() and size == ref_size
        assert log["nll_loss"].item() == ref_log["nll_loss"].item()
        assert log["kd_loss"].item() > 0  # the KD term is computed (and logged) even when unweighted


def ls_nll_float64(logits, target, pad, eps):
    """sum over non-pad tokens of (1 - eps) (-log q_y) + eps / (V - 1) sum_{c != y} (-log q_c), in float64."""
    lq = torch.log_softmax(logits.double(), -1)[target.ne(pad)]
    y = target[target.ne(pad)]
    nll = -lq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = -lq.sum(-1) - nll
    return ((1 - eps) * nll + eps / (lq.size(-1) - 1) * others).sum()


@pytest.mark.parametrize("alpha", ["0.3", "0.7", "1"])
def test_loss_is_mix_of_gold_and_teacher_kl(data_bin, teacher, alpha):
    """T=2: loss = (1-a) LS-NLL(gold) + a T^2 sum_t KL(p_T || q_T), recomputed here in float64 from raw outputs."""
    task, model, crit, _, _ = _pair(data_bin, teacher, "--kd-alpha", alpha, "--kd-temperature", "2")
    sample = first_batch(task)
    loss, _, log = criterion_loss(task, model, crit, sample)
    with torch.no_grad():
        s_logits = model(**sample["net_input"])[0].double()
        t_logits = task.teacher.models[0](**sample["net_input"])[0].double()
    pad = task.target_dictionary.pad()
    mask = sample["target"].ne(pad)
    p = torch.softmax(t_logits / 2, -1)[mask]
    kl = (p * (p.log() - torch.log_softmax(s_logits / 2, -1)[mask])).sum()
    ls = ls_nll_float64(s_logits, sample["target"], pad, 0.1)
    a = float(alpha)
    assert log["kd_loss"].item() == pytest.approx(4 * kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx((1 - a) * ls.item() + a * 4 * kl.item(), rel=1e-5)


def test_topk_equal_to_vocab_equals_full(data_bin, teacher):
    task, model, crit, _, _ = _pair(data_bin, teacher, "--kd-alpha", "0.7", "--kd-divergence", "js")
    sample = first_batch(task)
    full, _, _ = criterion_loss(task, model, crit, sample)
    crit.topk = len(task.target_dictionary)
    topk, _, _ = criterion_loss(task, model, crit, sample)
    crit.topk = 4
    small, _, _ = criterion_loss(task, model, crit, sample)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)
    assert small.item() != pytest.approx(full.item(), rel=1e-3)


def test_ensemble_averages_member_probabilities(data_bin, teacher, teacher2):
    _, task, model, crit = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                 "--teacher-path", teacher + ":" + teacher2)
    sample = first_batch(task)
    signal = task.teacher.signal(sample["net_input"], model)["lprobs"].double()
    with torch.no_grad():
        probs = [torch.softmax(m(**sample["net_input"])[0].double(), -1) for m in task.teacher.models]
    assert torch.allclose(signal.exp(), (probs[0] + probs[1]) / 2, atol=1e-6)


def _mean_kl_to_teacher(data_bin, student_ckpt, teacher_ckpt):
    """Mean per-token KL(teacher || student) on the valid split, from the saved checkpoints."""
    _, task, _, crit = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                             "--teacher-path", teacher_ckpt, "--kd-alpha", "1")
    from fairseq import checkpoint_utils
    [student], _ = checkpoint_utils.load_model_ensemble([student_ckpt], task=task)
    sample = first_batch(task, max_tokens=100000)
    _, _, log = criterion_loss(task, student, crit, sample)
    return log["kd_loss"].item() / log["ntokens"]


@pytest.fixture(scope="module")
def soft_teacher(tmp_path_factory, data_bin):
    """A teacher whose distributions are far from the gold one-hot targets: the teacher architecture trained with
    label smoothing 0.5, so it spreads half its mass where a student trained on gold (smoothing 0.1) puts ~none."""
    save = str(tmp_path_factory.mktemp("soft-teacher"))
    train(data_bin, save, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.5",
          arch=TEACHER_ARCH, max_update=150)
    return save + "/checkpoint_last.pt"


def test_kd_student_gets_closer_to_teacher_and_decodes_with_stock_fairseq(data_bin, soft_teacher, teacher,
                                                                             teacher2, tmp_path):
    """Train the same student with and without KD from a soft teacher; the KD student has the lower KL to it."""
    plain, kd, ens = (str(tmp_path / n) for n in ("plain", "kd", "ens"))
    train(data_bin, plain, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
    log = kd_train(data_bin, kd, "--criterion", "token_kd", "--teacher-path", soft_teacher, "--kd-alpha", "1")
    assert "kd_loss" in log
    kl_plain = _mean_kl_to_teacher(data_bin, plain + "/checkpoint_last.pt", soft_teacher)
    kl_kd = _mean_kl_to_teacher(data_bin, kd + "/checkpoint_last.pt", soft_teacher)
    assert kl_kd < 0.8 * kl_plain, (kl_kd, kl_plain)  # measured: 0.423 vs 0.678 nats/token (0.62x)

    # top-K and an ensemble train too, with the same tiny budget
    log = kd_train(data_bin, ens, "--criterion", "token_kd", "--teacher-path", teacher + ":" + teacher2,
                   "--kd-topk", "8", "--kd-select", "global", "--kd-select-queue", "500", max_update=20)
    assert last_valid(log, "kd_loss") > 0

    # the student checkpoint has exactly a plain student's weights, no teacher
    kd_state, plain_state = load_state(kd + "/checkpoint_last.pt"), load_state(plain + "/checkpoint_last.pt")
    assert set(kd_state["model"]) == set(plain_state["model"])
    assert "criterion" not in kd_state or not kd_state["criterion"]
    size = os.path.getsize(kd + "/checkpoint_last.pt")
    assert size < 1.1 * os.path.getsize(plain + "/checkpoint_last.pt")

    # stock fairseq-generate, no --user-dir
    out = run("fairseq-generate", data_bin, "--path", kd + "/checkpoint_last.pt", "--gen-subset", "test",
              "--beam", "2", "--batch-size", "64")
    hyps = [line for line in out.splitlines() if line.startswith("H-")]
    assert len(hyps) == 100
    assert "BLEU4" in out
