"""The benchmark's measured runs (benchmarks/bench_kd.py): fairseq-train commands of every configuration, a run
timed from its log and its CPU time, peak RSS of that child alone, and the loss-level memory probes."""
import os
import re
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

from kdexp.configs import BENCH as CONFIGS, PROBES
from kdexp.pipeline import REPO, tool
from kdexp.recipes import model_args

USER_DIR = os.path.join(REPO, "kd_plugin")
BENCH_KD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_kd.py")


def _cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_INNER = re.compile(r"\| train_inner \| epoch (\d+):.*num_updates=(\d+)")


def run_measured(cmd, log_path, env, warmup, last):
    """Run fairseq-train ``cmd`` (output to ``log_path``, env with PYTHONUNBUFFERED=1) and measure it:
    exit status, wall seconds, peak RSS (bytes, ru_maxrss of this child alone: os.wait4) and the child's
    CPU seconds between its train_inner lines at ``warmup`` and ``last`` updates (the log is polled every
    20 ms and /proc/PID/stat read when a line appears; CPU time does not count waiting for a shared core).
    """
    start, cpu, pos = time.time(), {}, 0
    with open(log_path, "w") as log:
        log.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while True:
            with open(log_path, "rb") as f:
                f.seek(pos)
                data = f.read()
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            pos += len(data)
            lines = data.decode("utf-8", errors="replace")
            for m in _INNER.finditer(lines):
                if int(m.group(2)) in (warmup, last) and int(m.group(2)) not in cpu:
                    cpu[int(m.group(2))] = _cpu_seconds(proc.pid)  # readable until the child is reaped
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu.setdefault(last, usage.ru_utime + usage.ru_stime)  # (missed the line: the whole run, a slight excess)
    return {"rc": proc.returncode, "wall": time.time() - start, "rss": usage.ru_maxrss * 1024,
            "cpu": cpu[last] - cpu[warmup] if warmup in cpu else None}


def measured_tokens(log_path, warmup):
    """(tokens, fairseq words/s, sentences/s) of the train_inner intervals after ``warmup`` updates, the
    words/s being sum(tokens) / sum(tokens / wps): each line covers the updates since the previous one, wpb
    tokens and bsz sentences each. Sentences/s is 1 / time per sentence, i.e. proportional to epochs/s:
    unlike words/s it does not depend on how long the targets trained on are (teacher outputs or gold).
    Refuses logs whose measured updates cross an epoch boundary (the split is too small).
    """
    tokens = seconds = sentences = 0.0
    last, epochs = 0, set()
    with open(log_path, errors="replace") as f:
        for line in f:
            if not _INNER.search(line):
                continue
            kv = dict(re.findall(r"(\w+)=([-+\d.e]+)", line))
            updates, done = int(kv["num_updates"]) - last, last
            last = int(kv["num_updates"])
            if done < warmup:
                continue
            epochs.add(_INNER.search(line).group(1))
            n = float(kv["wpb"]) * updates
            tokens, seconds = tokens + n, seconds + n / float(kv["wps"])
            sentences += float(kv["bsz"]) * updates
    if not tokens:
        raise RuntimeError("%s: no train_inner line after %d warm-up updates" % (log_path, warmup))
    if len(epochs) > 1:
        raise RuntimeError("%s: the measured updates span epochs %s: raise --train-sentences"
                           % (log_path, sorted(epochs)))
    return tokens, tokens / seconds, sentences / seconds


def train_cmd(a, data, criterion_args, max_update, role="student", extra=()):
    """fairseq-train: the demo's architecture of ``role`` and optimizer, the benchmark's batches and logging."""
    return [tool("fairseq-train"), data, "--source-lang", a.src, "--target-lang", a.tgt] \
        + [str(x) for x in model_args(a, role)] + list(criterion_args) + [
        "--dropout", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(a.demo_warmup),
        "--warmup-init-lr", "1e-07",
        "--max-tokens", str(a.max_tokens), "--max-update", str(max_update), "--seed", str(a.seed),
        "--num-workers", "0", "--log-format", "simple", "--log-interval", str(a.log_interval),
        "--no-progress-bar"] + list(extra)


def config_args(a, name, paths):
    """The criterion/task flags of configuration ``name``, placeholders filled from ``paths``."""
    fields = dict(paths, user_dir=paths.get("user_dir", USER_DIR), topk=a.topk)
    return [x.format(**fields) for x in CONFIGS[name][1].flags()]


def config_cmd(a, name, paths):
    return train_cmd(a, paths["data"], config_args(a, name, paths), a.warmup + a.updates,
                     extra=["--no-save", "--disable-validation"])



# ---------------------------------------------------------------------------------------------- loss probe

def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def probe(name, tokens, vocab, topk):
    r"""Extra peak RSS of one loss forward + backward, in units of one (tokens x vocab) float32 tensor.

    Inputs (not counted): the student logits (a leaf, as the output projection's output is) and the
    teacher's full log-probs; the peak is taken over the forward and backward (VmHWM, reset first).
    """
    import torch
    import torch.nn.functional as F
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from fairseq.data import Dictionary

    from kd_plugin.criterions.token_kd import TokenKDCriterion
    from kd_plugin.needs import TEACHER
    from kd_plugin.tasks.translation_kd import TranslationKDConfig, TranslationKDTask

    torch.manual_seed(0)
    bsz, length = tokens // 32, 32
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol("w%d" % i)
    logits = torch.randn(bsz, length, vocab).requires_grad_()
    teacher = {"lprobs": F.log_softmax(torch.randn(bsz, length, vocab), -1)}
    target = torch.randint(d.nspecial, vocab, (bsz, length))
    model = SimpleNamespace(get_normalized_probs=lambda out, log_probs: F.log_softmax(out[0].float(), -1),
                            get_targets=lambda sample, out: sample["target"])
    kw = PROBES[name][1]
    # built as fairseq builds it, from its config (every field given), with the real task class (no data, no
    # teacher: never loaded)
    crit = None if kw is None else TokenKDCriterion.build_criterion(CRITERION_DATACLASS_REGISTRY["token_kd"](
        sentence_avg=False, **{k: topk if v is None else v for k, v in kw.items()}),
        TranslationKDTask(TranslationKDConfig(data="unused"), d, d))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _rss("VmRSS")
    if crit is None:
        lprobs = model.get_normalized_probs((logits,), log_probs=True)
        loss, _ = label_smoothed_nll_loss(lprobs.view(-1, vocab), target.view(-1), 0.1, ignore_index=d.pad())
    else:
        ls, _, kd = crit.token_terms(model, (logits, None), {"target": target, TEACHER: teacher})
        loss = crit.token_loss(ls, kd)
    loss.backward()
    return (_rss("VmHWM") - base) / (tokens * vocab * 4)


def run_probes(a, env):
    """Each probe in a fresh interpreter (so allocator state does not leak between them)."""
    out = {}
    for name in PROBES:
        cmd = [sys.executable, BENCH_KD, "--probe", name, "--probe-tokens", str(a.probe_tokens),
               "--vocab", str(a.probe_vocab), "--topk", str(a.topk)]
        out[name] = float(subprocess.check_output(cmd, cwd=REPO, env=env, text=True).strip().splitlines()[-1])
    return out


