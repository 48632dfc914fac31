"""What only a GPU can check (run by scripts/gpu_check.sh, docs/GPU.md): fairseq's own --fp16 / --bf16.

- every criterion (token_kd online and from a cache, sentence_kd, hybrid_kd) trains with real fairseq-train
  in each precision, its saved weights are values of that half dtype, and stock fairseq-generate
  (no --user-dir) decodes it;
- cached and online top-K teachers give the same loss on a half-precision student on GPU;
- an fp16 teacher whose logits overflow (finite in fp32) does not kill the run: kd_plugin/teacher.py reruns
  such a batch in float32.
Without CUDA every ``gpu`` test is skipped before any fixture runs (no teacher is trained); the last test
(no GPU needed) checks scripts/gpu_check.sh's bundle check. KD_GPU_TESTS_ON_CPU=1
runs the same tests on CPU in float32 (half precision and the overflow test left out): a check of their
plumbing, not of half precision.
"""
import hashlib
import math
import os
import re
import subprocess

import pytest
import torch
from fairseq import checkpoint_utils, utils

from helpers import REPO, kd_train, load_state, run
from inproc import build, cast_sample, criterion_loss, first_batch
from test_teacher_cache import K, cache  # noqa: F401  (fixture: kd-dump-teacher top-K cache of train/valid)

ON_CPU = os.environ.get("KD_GPU_TESTS_ON_CPU") == "1"


def gpu(test):
    """Marked ``gpu`` (pytest -m gpu) and skipped without CUDA, before any fixture runs."""
    skip = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs CUDA (fairseq --fp16/--bf16)")
    return pytest.mark.gpu(skip(test))


# precision -> (fairseq-train flags, dtype, fairseq-generate flags: stock generate has --fp16 but no bf16 path)
PRECISIONS = {"fp32-cpu": (["--cpu"], torch.float32, ["--cpu"])} if ON_CPU else {
    "fp16": (["--fp16"], torch.float16, ["--fp16"]), "bf16": (["--bf16"], torch.bfloat16, [])}
DEVICE = "cpu" if ON_CPU else "cuda"
CASES = {  # case -> criterion flags, from the fixtures by name
    "token_kd-online": lambda f: ["--criterion", "token_kd", "--teacher-path", f("teacher")],
    "token_kd-cache": lambda f: ["--criterion", "token_kd", "--kd-topk", K, "--teacher-cache", f("cache")],
    "sentence_kd": lambda f: ["--criterion", "sentence_kd", "--teacher-targets", f("teacher_targets")],
    "hybrid_kd": lambda f: ["--criterion", "hybrid_kd", "--kd-gate", "sentence", "--teacher-path", f("teacher"),
                            "--teacher-targets", f("teacher_targets")],
}


NUMBER = r"([-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))\b"


def values(log, key):
    """Every number logged as ``key`` (train_inner ``key=v``, train/valid ``| key v``); nan/inf included."""
    return [float(v) for v in re.findall(r"\b%s[= ]%s" % (key, NUMBER), log)]


def first_and_last_valid(log, key="loss"):
    vals = [v for line in log.splitlines() if "| valid on" in line for v in values(line, key)]
    assert len(vals) >= 2, "fewer than two validations in the log:\n%s" % log[-3000:]
    return vals[0], vals[-1]


@gpu
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_criterion_trains_in_half_precision_and_decodes_with_stock_fairseq(
        request, data_bin, tmp_path, case, precision):
    flags, dtype, gen_flags = PRECISIONS[precision]
    save = str(tmp_path / "student")
    log = kd_train(data_bin, save, *CASES[case](request.getfixturevalue), "--label-smoothing", "0.1", *flags,
                   max_update=30)
    losses = values(log, "loss")
    assert losses and all(math.isfinite(v) for v in losses), losses
    start = values(next(line for line in log.splitlines() if "| train_inner |" in line), "loss")[0]
    first, last = first_and_last_valid(log)
    # it learns: on CPU in float32 the last validation is 0.77-0.80 x the first logged training loss
    assert last < first and last < 0.85 * start, (start, first, last)
    if case != "sentence_kd":
        kd = values(log, "kd_loss")
        assert kd and all(math.isfinite(v) and v > 0 for v in kd), kd
    # fairseq keeps fp32 master weights in the optimizer and the model in half precision; it saves the model
    # as float32 (utils.move_to_cpu), so each saved weight must be a value of the half dtype
    state = load_state(os.path.join(save, "checkpoint_last.pt"))
    weights = [v for k, v in state["model"].items() if k.endswith(".weight")]
    assert weights and all(torch.equal(w.to(dtype).float(), w.float()) for w in weights)
    out = run("fairseq-generate", data_bin, "--path", os.path.join(save, "checkpoint_last.pt"), "--gen-subset",
              "valid", "--beam", "2", "--batch-size", "64", *gen_flags)
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100
    assert "BLEU4" in out


def cuda_half(dtype, *modules):
    return [m.to(device=DEVICE, dtype=dtype) for m in modules]


@gpu
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_cached_and_online_teacher_agree_on_a_half_student(data_bin, teacher, cache, precision):  # noqa: F811
    """token_kd top-K (T=2): the same half-precision student and batch, the teacher from kd-dump-teacher's
    cache (fp32 teacher, stored as float16) or online (in the student's dtype, log_softmax in float32).
    Measured in-process on CPU, same batch (837 tokens): relative differences 8e-6 (fp32), 1.4e-4 (fp16),
    4e-5 (bf16); the tolerances leave >10x room for CUDA's half kernels."""
    _, dtype, _ = PRECISIONS[precision]
    kd = ["--task", "translation_kd", "--criterion", "token_kd", "--kd-topk", K, "--kd-alpha", "0.5",
          "--kd-temperature", "2", "--label-smoothing", "0.1"]
    _, task_c, model, crit_c = build(data_bin, *kd, "--teacher-cache", cache)
    _, task_o, model_o, crit_o = build(data_bin, *kd, "--teacher-path", teacher)
    model_o.load_state_dict(model.state_dict())
    model, model_o, crit_c, crit_o = cuda_half(dtype, model, model_o, crit_c, crit_o)
    task_c.load_dataset("valid")
    ds_c = task_c.dataset("valid")
    batch = first_batch(task_o, max_tokens=2000)
    ids = batch["id"].tolist()
    s_c = ds_c.collater([ds_c[i] for i in ids])
    assert "teacher" in s_c and "teacher" not in batch
    move = (lambda s: s) if ON_CPU else utils.move_to_cuda
    s_c, s_o = (cast_sample(move(s), dtype) for s in (s_c, batch))
    loss_c, size_c, log_c = criterion_loss(task_c, model, crit_c, s_c)
    loss_o, size_o, log_o = criterion_loss(task_o, model_o, crit_o, s_o)
    assert size_c == size_o
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert float(log_c["kd_loss"]) == pytest.approx(float(log_o["kd_loss"]), rel=tol)
    assert float(loss_c) == pytest.approx(float(loss_o), rel=tol)


@gpu
@pytest.mark.skipif(ON_CPU, reason="float32 on CPU does not overflow")
def test_overflowing_fp16_teacher_is_rerun_in_fp32_and_the_run_completes(data_bin, teacher, tmp_path):
    """The teacher's output projection scaled so its largest valid logit is ~3 x fp16's maximum (65504):
    its fp16 logits hold inf, its fp32 ones are finite. token_kd --fp16 must train on it to the end."""
    state = load_state(teacher)
    key = "decoder.output_projection.weight"
    assert key in state["model"], sorted(state["model"])
    models, _ = checkpoint_utils.load_model_ensemble([teacher])
    net_input = utils.move_to_cuda(first_batch_of(data_bin)["net_input"])
    with torch.no_grad():
        peak = models[0].cuda().eval()(**net_input)[0].abs().max().item()
    scale = 2e5 / peak
    state["model"][key] = state["model"][key] * scale
    assert state["model"][key].abs().max() < 6e4  # the weights themselves stay finite in fp16
    overflow = str(tmp_path / "overflow.pt")
    torch.save(state, overflow)
    models, _ = checkpoint_utils.load_model_ensemble([overflow])
    m = models[0].cuda().eval()
    with torch.no_grad():
        assert torch.isfinite(m(**net_input)[0]).all()  # fp32: finite
        assert not torch.isfinite(m.half()(**net_input)[0]).all()  # fp16: overflows
    log = kd_train(data_bin, str(tmp_path / "student"), "--criterion", "token_kd", "--teacher-path", overflow,
                   "--label-smoothing", "0.1", "--fp16", max_update=20)
    assert "num_updates 20" in log or "num_updates=20" in log
    losses = values(log, "loss") + values(log, "kd_loss")
    assert values(log, "kd_loss") and all(math.isfinite(v) for v in losses), losses


def first_batch_of(data_bin):
    """The first valid batch of the stock translation task (the teacher's own)."""
    _, task, _, _ = build(data_bin, "--task", "translation", "--criterion", "label_smoothed_cross_entropy")
    return first_batch(task, max_tokens=2000)


BUNDLE = ["sdist/fairseq-0.12.2.tar.gz", "wheels/hydra_core-1.3.2-py3-none-any.whl",
          "wheels/omegaconf-2.3.0-py3-none-any.whl", "wheels/antlr4_python3_runtime-4.9.3-py3-none-any.whl",
          "wheels/bitarray-3.12.3-cp312-cp312-manylinux_2_17_x86_64.whl"]


def check_bundle(bundle):
    p = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--check-bundle"],
                       env=dict(os.environ, GPU_BUNDLE=str(bundle)), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    return p.returncode, p.stdout


def test_bundle_check_accepts_a_complete_bundle_and_names_what_is_missing_or_damaged(tmp_path):
    """`gpu_check.sh --check-bundle` on a bundle laid out as scripts/gpu_bundle.sh lays it out (files with
    stand-in contents): complete -> exit 0; a distribution missing, or a file whose sha256 differs from
    MANIFEST -> exit 2 and one line naming it."""
    def write(files):
        manifest = []
        for i, name in enumerate(files):
            os.makedirs(os.path.dirname(str(tmp_path / name)), exist_ok=True)
            (tmp_path / name).write_bytes(b"%d" % i)
            manifest.append("%s  %s" % (hashlib.sha256(b"%d" % i).hexdigest(), name))
        (tmp_path / "MANIFEST").write_text("\n".join(manifest + ["python 3.12"]) + "\n")

    write(BUNDLE)
    assert check_bundle(tmp_path) == (0, "gpu_check: bundle %s complete (Python 3.12): 5 files\n" % tmp_path)
    (tmp_path / BUNDLE[1]).write_bytes(b"changed")
    rc, out = check_bundle(tmp_path)
    assert rc == 2 and BUNDLE[1] in out and "damaged" in out and len(out.splitlines()) == 1, out
    for missing in (BUNDLE[0], BUNDLE[4]):
        write([f for f in BUNDLE if f != missing])
        rc, out = check_bundle(tmp_path)
        assert rc == 2 and "lacks %s" % missing.split("-")[0] in out and len(out.splitlines()) == 1, out
    write(BUNDLE[:4] + [BUNDLE[4].replace("cp312", "cp311")])  # bitarray built for another Python
    assert check_bundle(tmp_path)[0] == 2
