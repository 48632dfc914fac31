#!/usr/bin/env python3
"""A teacher worth distilling, trained to its plateau on the demo corpus (issue 20; `make teacher`).

    .venv/bin/python examples/plateau_teacher.py             # build or resume; skips what is built
    .venv/bin/python examples/plateau_teacher.py --quick     # smoke run on the demo's --quick corpus

The demo's cached data steps (examples/demo.py: corpus, sentencepiece BPE, fairseq-preprocess) under --work
(default work/plateau), then ONE fairseq-train run of the architecture below with early stopping: fairseq's
own ``--eval-bleu`` decodes the validation set after every epoch (beam 5, the demo's length cap), the best
checkpoint is kept by validation BLEU, and training stops after ``--patience`` epochs without a new best (or
at ``--max-epoch``). Resumable: fairseq-train restores WORK/ckpt/teacher/checkpoint_last.pt when rerun with
the same command, so an interrupted run continues where it stopped. Then the best checkpoint is scored on the
test set with stock fairseq-generate (beam 5) and sacreBLEU, and a record (command, per-epoch curve, wall
seconds, BLEU/chrF) is written to WORK/teacher.json for docs/PLATEAU.md and docs/plateau_results.json.
Every flag that defines the run is spelled out in TEACHER (no fairseq or plugin default is relied on).
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
from demo_pipeline import REPO, Pipeline, StepFailed, tool  # noqa: E402

# (full, quick) architecture and optimization of the plateau teacher
ARCH = {"layers": (3, 1), "dim": (192, 32), "ffn": (768, 64), "heads": (4, 2)}
TEACHER = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--dropout", "0.3", "--attention-dropout", "0.1", "--activation-dropout", "0.1", "--weight-decay", "0.0001",
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
           "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "500", "--warmup-init-lr", "1e-07",
           "--max-tokens", "4096", "--num-workers", "0"]
EVAL_ARGS = {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
EVAL_BLEU = ["--eval-bleu", "--eval-bleu-args", json.dumps(EVAL_ARGS), "--eval-bleu-detok", "space",
             "--eval-bleu-remove-bpe", "sentencepiece", "--best-checkpoint-metric", "bleu",
             "--maximize-best-checkpoint-metric"]


def arch_flags(quick):
    """--arch transformer with shared embeddings and the teacher's per-side shape."""
    col = 1 if quick else 0
    v = {k: str(x[col]) for k, x in ARCH.items()}
    out = ["--arch", "transformer", "--share-all-embeddings"]
    for side in demo.SIDES:
        out += ["--%s-layers" % side, v["layers"], "--%s-embed-dim" % side, v["dim"],
                "--%s-ffn-embed-dim" % side, v["ffn"], "--%s-attention-heads" % side, v["heads"]]
    return out


def teacher_cmd(p, a):
    return [tool("fairseq-train"), p.path("data-bin"), "--source-lang", "de", "--target-lang", "en",
            "--seed", str(a.seed)] + arch_flags(a.quick) + TEACHER + EVAL_BLEU + [
            "--max-epoch", str(a.max_epoch), "--patience", str(a.patience),
            "--save-dir", p.path("ckpt", "teacher"), "--no-epoch-checkpoints",
            "--log-format", "simple", "--log-interval", "100"]


def epoch_curve(log):
    """[{epoch, valid_loss, valid_nll_loss, valid_bleu, num_updates, wall}] from fairseq-train's valid lines."""
    curve = []
    with open(log, errors="replace") as f:
        for line in f:
            if "| valid on 'valid' subset" not in line:
                continue
            fields = dict(re.findall(r"\| (\w+) ([-\d.e+]+)", line))
            curve.append({"epoch": int(fields["epoch"]), "valid_loss": float(fields["loss"]),
                          "valid_nll_loss": float(fields["nll_loss"]), "valid_bleu": float(fields.get("bleu", "nan")),
                          "num_updates": int(fields["num_updates"]), "wall": float(fields.get("wall", "nan"))})
    return curve


def train_teacher(p, a):
    """fairseq-train until early stopping; appends to WORK/logs/teacher.log so a resumed run keeps its curve."""
    done = p.path("done", "teacher-train.json")
    cmd = teacher_cmd(p, a)
    if os.path.isfile(done):
        p.progress("teacher", "trained (delete %s to train again)" % done)
        return cmd
    log = p.path("logs", "teacher.log")
    import subprocess

    start = time.time()
    with open(log, "a") as f:
        f.write("$ %s\n" % " ".join(cmd))
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=p.env)
    if rc != 0:
        raise StepFailed("teacher training failed (exit %d); log: %s" % (rc, log))
    with open(done, "w") as f:
        json.dump({"seconds_this_run": time.time() - start, "cmd": cmd}, f)
    return cmd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's --quick corpus and a tiny teacher")
    parser.add_argument("--work", default=None, help="work directory (default work/plateau[-quick])")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patience", type=int, default=6, help="epochs without a new best validation BLEU")
    parser.add_argument("--max-epoch", type=int, default=60, help="cap on epochs")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)")
    a = parser.parse_args(argv)
    a.work = a.work or os.path.join(REPO, "work", "plateau-quick" if a.quick else "plateau")
    d = demo.parse_args(["--work", a.work, "--threads", str(a.threads)] + (["--quick"] if a.quick else []))
    p = Pipeline(d)
    try:
        demo.prepare_data(p)
        cmd = train_teacher(p, a)
    except StepFailed as e:
        sys.exit("plateau_teacher: %s" % e)
    curve = epoch_curve(p.path("logs", "teacher.log"))
    p.progress("teacher", "%d epochs, best valid BLEU %.2f" % (len(curve), max(c["valid_bleu"] for c in curve)))
    with open(p.path("teacher.json"), "w") as f:
        json.dump({"cmd": cmd, "curve": curve}, f, indent=1)


if __name__ == "__main__":
    main()
