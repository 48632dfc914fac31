"""--fp16 / --bf16 as fairseq's Trainer runs them, in-process on CPU (fairseq's flags themselves need CUDA).

Under --fp16/--bf16 the Trainer halves the model AND the criterion (``criterion.half()`` / ``.to(bfloat16)``),
casts every float32 tensor of the sample (``Trainer._prepare_sample``), and only then calls the task's
``train_step``, where the online teacher adds its signal. The rules these tests check:
- criterion state stays float32 (hybrid_kd's running means: a bf16 buffer would round a 1% momentum step away);
- every teacher signal reaches the criterion unrounded: online ones are float32 (log_softmax in float32),
  cached ones keep their stored float16 (the cast touches float32 only), so cache and online agree as in fp32;
- a half-precision teacher whose logits overflow reruns that batch in float32 instead of killing the run;
- each criterion's loss and gradient stay within a stated tolerance of float32.
"""
import copy

import pytest
import torch

from inproc import build, cast_sample, first_batch

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# |half - fp32| / |fp32| bounds for the loss and for the whole gradient (relative L2): fp16 has 11 mantissa
# bits, bf16 8; the tiny model's sums run over a few hundred tokens
TOL = {"fp16": (5e-3, 5e-2), "bf16": (3e-2, 2e-1)}
CASES = {
    "token_kd": lambda t, tt: ["--criterion", "token_kd", "--teacher-path", t],
    "sentence_kd": lambda t, tt: ["--criterion", "sentence_kd", "--teacher-targets", tt],
    "hybrid_kd": lambda t, tt: ["--criterion", "hybrid_kd", "--kd-gate", "sentence", "--teacher-path", t,
                                "--teacher-targets", tt],
}


def train_step(task, model, criterion, sample, dtype=None):
    """(loss, gradient vector, logging output) of one training forward/backward, cast as the Trainer casts."""
    if dtype is not None:
        model, criterion = model.to(dtype), criterion.to(dtype)
        sample = cast_sample(sample, dtype)
    sample = dict(sample)
    model.train()
    criterion.train()
    model.zero_grad()
    task.add_teacher_signal(sample, model)
    loss, _, log = criterion(model, sample)
    loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return loss.float(), grad, log


def _build(data_bin, teacher, teacher_targets, name, *extra):
    return build(data_bin, "--task", "translation_kd", "--label-smoothing", "0.1", "--dropout", "0",
                 *CASES[name](teacher, teacher_targets), *extra)


@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name", list(CASES))
def test_half_precision_loss_and_gradient_close_to_fp32(data_bin, teacher, teacher_targets, name, half):
    cfg, task, model, criterion = _build(data_bin, teacher, teacher_targets, name)
    sample = first_batch(task, "train")
    half_model, half_crit = copy.deepcopy(model), task.build_criterion(cfg.criterion)
    half_crit.load_state_dict(criterion.state_dict())
    loss, grad, _ = train_step(task, model, criterion, sample)
    task.teacher and task.teacher._follow(next(model.parameters()).to(HALF[half]))  # teacher follows the student
    h_loss, h_grad, _ = train_step(task, half_model, half_crit, sample, HALF[half])
    assert next(half_model.parameters()).dtype == HALF[half]
    loss_tol, grad_tol = TOL[half]
    assert abs(h_loss - loss) / loss < loss_tol, (h_loss, loss)
    assert ((h_grad - grad).norm() / grad.norm()) < grad_tol
    if task.teacher is not None:
        task.teacher._follow(next(model.parameters()))


@pytest.mark.parametrize("half", list(HALF))
def test_hybrid_running_means_stay_fp32_and_update(data_bin, teacher, teacher_targets, half):
    _, task, model, criterion = _build(data_bin, teacher, teacher_targets, "hybrid_kd", "--kd-gate-momentum", "0.99")
    criterion.benefit.mean_tok.fill_(3.0)
    criterion.benefit.mean_sent.fill_(3.0)
    criterion.to(HALF[half])
    assert criterion.gate.out.weight.dtype == HALF[half]  # the gate is halved like any parameter
    assert criterion.benefit.mean_tok.dtype == torch.float32 and criterion.benefit.mean_tok.item() == 3.0
    d_tok = torch.tensor([3.2, 3.4], dtype=HALF[half])  # batch mean 3.3: one step moves the mean by 0.003
    d_sent = torch.tensor([2.6, 3.0], dtype=HALF[half])
    target = criterion.benefit(d_tok, d_sent, update=True)
    expected_tok = 0.99 * 3.0 + 0.01 * d_tok.double().mean().item()
    expected_sent = 0.99 * 3.0 + 0.01 * d_sent.double().mean().item()
    assert criterion.benefit.mean_tok.item() == pytest.approx(expected_tok, abs=1e-6)
    assert criterion.benefit.mean_sent.item() == pytest.approx(expected_sent, abs=1e-6)
    assert criterion.benefit.mean_tok.item() != 3.0
    assert target.dtype == torch.float32
    state = criterion.state_dict()
    assert state["benefit.mean_tok"].dtype == torch.float32  # checkpoints keep full precision


def test_cached_signal_is_not_rounded_by_the_bf16_cast(data_bin, teacher, tmp_path):
    from kd_plugin.cli import dump_teacher

    out = str(tmp_path / "cache")
    dump_teacher.cli_main(["--data", data_bin, "--path", teacher, "--split", "valid", "--out", out, "--topk", "4"])
    _, task, model, criterion = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                      "--teacher-cache", out, "--kd-topk", "4", "--label-smoothing", "0.1")
    sample = first_batch(task)
    for key, value in sample["teacher"].items():
        assert not value.is_floating_point() or value.dtype == torch.float16, (key, value.dtype)
    for dtype in HALF.values():
        cast = cast_sample(sample, dtype)
        for key, value in sample["teacher"].items():
            assert torch.equal(cast["teacher"][key], value), key


def test_overflowing_fp16_teacher_reruns_in_fp32(data_bin, teacher):
    _, task, model, criterion = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                      "--teacher-path", teacher, "--label-smoothing", "0.1")
    sample = first_batch(task)
    member = task.teacher.models[0]
    with torch.no_grad():
        member.decoder.output_projection.weight.mul_(30000.0)
        logits = member(**sample["net_input"])[0]
    assert 65504 < logits.abs().max() < 1e30  # overflows in fp16, finite in fp32: the test means something
    reference = task.teacher.signal(sample["net_input"], model)["lprobs"]
    half_model = copy.deepcopy(model).half()
    signal = task.teacher.signal(cast_sample(sample, torch.float16)["net_input"], half_model)["lprobs"]
    assert task.teacher.fp32_reruns == 1
    assert next(member.parameters()).dtype == torch.float16  # back to the student's dtype after the rerun
    assert signal.dtype == torch.float32 and torch.isfinite(signal).all()
    # the rerun is the float32 teacher on the same batch (its fp16-rounded weights): close to the fp32 signal
    assert torch.allclose(signal.exp(), reference.exp(), atol=2e-2)


def test_non_finite_fp32_teacher_is_an_error(data_bin, teacher):
    _, task, model, criterion = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                      "--teacher-path", teacher, "--label-smoothing", "0.1")
    sample = first_batch(task)
    with torch.no_grad():
        task.teacher.models[0].decoder.output_projection.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="teacher .* produced NaN/inf logits"):
        task.teacher.signal(sample["net_input"], model)
