"""Faults: training killed with SIGKILL mid-epoch resumes exactly; student checkpoints hold no teacher;
kd-dump-teacher and kd-distill-corpus killed mid-way and rerun write the bytes of a clean run.

Resume: fairseq restores the model, optimizer, lr schedule, data position (``iterations_in_epoch``) and
seeds every update with seed + num_updates, and the criterion's state: hybrid_kd's gate (parameters, by
fairseq) with its running means (buffers), and token_kd's --kd-select global queue (buffers of a criterion
without parameters, which fairseq would drop: kd_plugin.fairseq_patches.criterion_state saves them). So the
resumed run must equal the uninterrupted one bit for bit.
"""
import os
import re
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import BIN, TINY_ARCH, TRAIN_COMMON, USER_DIR, load_state, run, train

from kd_plugin.cli import distill_corpus, dump_teacher

MAX_UPDATE, SAVE_EVERY, KILL_AT = 20, 5, 7  # an epoch is 18 updates: the resumed run crosses into epoch 2
RUN_FLAGS = ["--log-interval", 1, "--save-interval-updates", SAVE_EVERY, "--disable-validation"]
CRITERIA = {
    "hybrid_kd": lambda t, targets: ["--criterion", "hybrid_kd", "--kd-gate", "sentence", "--teacher-path", t,
                                     "--teacher-targets", targets],
    "token_kd_global": lambda t, targets: ["--criterion", "token_kd", "--teacher-path", t, "--kd-select", "global",
                                           "--kd-select-rate", "0.3", "--kd-select-queue", "2000"],
}
# encoder-layer copies for PyTorch's fast path: unused (disabled), zeros in a fresh model and copies of the
# real weights after a load; and an uninitialized placeholder
UNUSED = re.compile(r"(_float_tensor|layers\.\d+\.(in_proj|out_proj|fc1|fc2)_(weight|bias))$")
SPEED = {"wps", "ups", "train_wall", "wall", "gb_free"}  # time-dependent


def train_cmd(data_bin, save_dir, flags):
    return [os.path.join(BIN, "fairseq-train"), data_bin, "--save-dir", save_dir, *TINY_ARCH, *TRAIN_COMMON,
            "--user-dir", USER_DIR, "--task", "translation_kd", "--label-smoothing", "0.1",
            "--max-update", MAX_UPDATE, *RUN_FLAGS, *flags]


def per_update(log):
    """{num_updates: {metric: value}} from --log-interval 1 train_inner lines (speed and time left out)."""
    rows = {}
    for line in log.splitlines():
        if "| train_inner |" in line:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", line))
            n = int(fields.pop("num_updates"))
            rows[n] = {k: v for k, v in fields.items() if k not in SPEED}
    return rows


def run_until_killed(cmd, save_dir, kill_at):
    """Start ``cmd``; SIGKILL it once update ``kill_at`` is logged and a checkpoint_last exists. Its log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        m = re.search(r"num_updates=(\d+),", line)
        if m and int(m.group(1)) >= kill_at and os.path.isfile(os.path.join(save_dir, "checkpoint_last.pt")):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    log = "".join(lines)
    assert p.returncode == -signal.SIGKILL, "the run ended before it was killed:\n" + log[-3000:]
    return log


def assert_same_state(a, b):
    """Two checkpoints hold the same model, optimizer and criterion state, bit for bit."""
    keys = [k for k in a["model"] if not UNUSED.search(k)]
    assert set(a["model"]) == set(b["model"])
    for k in keys:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for crit_a, crit_b in ((a.get("criterion") or {}, b.get("criterion") or {}),
                           (a["extra_state"].get("kd_criterion", {}), b["extra_state"].get("kd_criterion", {}))):
        assert set(crit_a) == set(crit_b) and all(torch.equal(v, crit_b[n]) for n, v in crit_a.items())
    opt_a, opt_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert set(opt_a) == set(opt_b)
    for i in opt_a:
        for name, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][name]) if torch.is_tensor(v) else v == opt_b[i][name], (i, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_bin, teacher, teacher_targets):
    """Each criterion's run without interruption: {name: (log, save dir)}, run side by side."""
    root = tmp_path_factory.mktemp("uninterrupted")

    def one(name):
        save = str(root / name)
        return run(*train_cmd(data_bin, save, CRITERIA[name](teacher, teacher_targets))), save

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CRITERIA, pool.map(one, CRITERIA)))


@pytest.mark.parametrize("name", list(CRITERIA))
def test_killed_run_resumes_exactly(name, uninterrupted, data_bin, teacher, teacher_targets, tmp_path):
    full_log, full_save = uninterrupted[name]
    full = per_update(full_log)
    assert sorted(full) == list(range(1, MAX_UPDATE + 1))
    save = str(tmp_path / "run")
    cmd = train_cmd(data_bin, save, CRITERIA[name](teacher, teacher_targets))
    killed = per_update(run_until_killed(cmd, save, KILL_AT))
    assert all(full[n] == row for n, row in killed.items())  # same seed, same trajectory until the kill

    last = load_state(os.path.join(save, "checkpoint_last.pt"))
    resume_at = last["optimizer_history"][-1]["num_updates"]
    position = last["extra_state"]["train_iterator"]
    assert resume_at % SAVE_EVERY == 0 and resume_at <= max(killed) < MAX_UPDATE
    assert position["epoch"] == 1 and position["iterations_in_epoch"] == resume_at < 18  # mid-epoch
    if name == "token_kd_global":  # the queue is in the checkpoint although the criterion has no parameters
        assert int(last["extra_state"]["kd_criterion"]["ce_queue.count"]) > 0
    else:
        assert set(last["criterion"]) >= {"gate.out.weight", "benefit.mean_tok", "benefit.mean_sent"}
    if name == "token_kd_global":  # without the saved queue the first resumed update differs: it matters
        lost = str(tmp_path / "queue_lost")
        shutil.copytree(save, lost)
        del last["extra_state"]["kd_criterion"]
        torch.save(last, os.path.join(lost, "checkpoint_last.pt"))
        cmd_lost = train_cmd(data_bin, lost, CRITERIA[name](teacher, teacher_targets) +
                             ["--max-update", resume_at + 1])
        lost_row = per_update(run(*cmd_lost))[resume_at + 1]
        assert lost_row["loss"] != full[resume_at + 1]["loss"]  # measured: 3.703 vs 3.6 (kd_loss 1.565 vs 1.359)

    log = run(*cmd)
    assert "Loaded checkpoint %s (epoch 1 @ %d updates)" % (os.path.join(save, "checkpoint_last.pt"), resume_at) \
        in log
    resumed = per_update(log)
    assert sorted(resumed) == list(range(resume_at + 1, MAX_UPDATE + 1))
    for n, row in resumed.items():
        assert row == full[n], (n, row, full[n])  # every logged metric, to its printed precision
    assert_same_state(load_state(os.path.join(save, "checkpoint_last.pt")),
                      load_state(os.path.join(full_save, "checkpoint_last.pt")))


def test_student_checkpoints_hold_no_teacher(uninterrupted, data_bin, tmp_path):
    """Same model keys and about the size of a plain student's checkpoint (the teacher is 4x the student)."""
    plain = str(tmp_path / "plain")
    train(data_bin, plain, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
          "--disable-validation", "--data-buffer-size", "0", max_update=2)  # see test_bad_input.variant_corpus
    plain_ckpt = os.path.join(plain, "checkpoint_last.pt")
    plain_state, plain_size = load_state(plain_ckpt), os.path.getsize(plain_ckpt)
    for name, (_, save) in uninterrupted.items():
        ckpt = os.path.join(save, "checkpoint_last.pt")
        state = load_state(ckpt)
        assert set(state["model"]) == set(plain_state["model"])
        assert not any("teacher" in k for k in list(state["model"]) + list(state.get("criterion") or {}))
        criterion = dict(state.get("criterion") or {}, **state["extra_state"].get("kd_criterion", {}))
        prefixes = {"hybrid_kd": ("gate.", "benefit."), "token_kd_global": ("ce_queue.",)}[name]
        assert criterion and all(k.startswith(prefixes) for k in criterion), list(criterion)
        # measured: hybrid +8.6% (the gate, 2.2k parameters with Adam moments), token_kd +2.4% (2000-value
        # queue); a teacher would add 240% (241k parameters vs the student checkpoint 399 kB)
        assert plain_size < os.path.getsize(ckpt) < 1.15 * plain_size, (name, os.path.getsize(ckpt), plain_size)


def killed_then_rerun(cmd, out_dir):
    """Kill ``cmd`` (a kd-* CLI with --log-interval 1) after its first progress line, check that it left no
    output (kd-distill-corpus has written nothing yet, kd-dump-teacher its temporary directory), then rerun it
    to the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env)
    for line in p.stderr:
        if "sents/s" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "it finished before it was killed"
    left = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    assert all(f.startswith(".") and ".tmp." in f for f in left), left  # at most its temporary directory
    run(*cmd)
    assert not [f for f in os.listdir(out_dir) if f.startswith(".")]  # the stale temporary directory is gone


def read_all(directory, prefix):
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))
            if f.startswith(prefix)}


def test_killed_dump_rerun_equals_clean_run_and_existing_output_is_refused(data_bin, teacher, tmp_path, capsys):
    flags = ["--data", data_bin, "--path", teacher, "--split", "train", "--topk", 8, "--batch-size", 8]
    clean, out = str(tmp_path / "clean"), str(tmp_path / "killed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): bit-identical float32 results
    try:
        dump_teacher.cli_main([str(a) for a in flags + ["--out", clean]])
    finally:
        torch.set_num_threads(threads)
    killed_then_rerun([os.path.join(BIN, "kd-dump-teacher"), *flags, "--out", out, "--log-interval", 1], out)
    reference = read_all(clean, "train.topk")
    assert len(reference) == 5 and read_all(out, "train.topk") == reference  # header (.json) included

    with pytest.raises(SystemExit) as e:  # existing output: exit status 2, one message, nothing touched
        dump_teacher.cli_main([str(a) for a in flags + ["--out", out]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1
    assert "--out: %s" % os.path.join(out, "train.topk.") in err and "already exists (pass --overwrite" in err
    assert read_all(out, "train.topk") == reference


def test_killed_distill_rerun_equals_clean_run_and_existing_output_is_refused(data_bin, teacher, teacher_targets,
                                                                               tmp_path, capsys):
    """The train split, killed after its first batch; the clean run is conftest's teacher_targets."""
    flags = ["--data", data_bin, "--path", teacher, "--split", "train", "--beam", 4, "--max-tokens", 4000]
    out = str(tmp_path / "killed")
    killed_then_rerun([os.path.join(BIN, "kd-distill-corpus"), *flags, "--out", out, "--log-interval", 1], out)
    reference = read_all(teacher_targets, "train.")
    assert len(reference) == 4 and read_all(out, "train.") == reference  # .bin .idx .txt .json

    with pytest.raises(SystemExit) as e:
        distill_corpus.cli_main([str(a) for a in flags + ["--out", out]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1 and "already exists (pass --overwrite" in err
    assert read_all(out, "train.") == reference
