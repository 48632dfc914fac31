#!/usr/bin/env python3
"""The plateau teacher (issue 28; `make teacher`): the demo's teacher architecture trained to convergence.

    .venv/bin/python examples/plateau_teacher.py             # build or resume; skips what is built
    .venv/bin/python examples/plateau_teacher.py --snapshot  # copy the in-flight run to artifacts/ (commit it)
    .venv/bin/python examples/plateau_teacher.py --quick     # smoke run on the demo's --quick corpus

The demo's cached data steps under --work (default work/plateau), then ONE fairseq-train run: the demo's
teacher (2+2 layers, d=128, ffn 512, 4 heads, shared embeddings, dropout 0.1, label smoothing 0.1, Adam,
--max-tokens 1500) with a cosine learning rate annealed from 3e-3 to 0 over a budget of --max-epoch epochs
(the cap), and early stopping on validation BLEU (fairseq's --eval-bleu, beam 5, the demo's length cap,
--patience epochs). The best checkpoint by validation BLEU is the teacher.

Resumable across machines: ``--snapshot`` copies checkpoint_last.pt, checkpoint_best.pt and the training
log to artifacts/inflight/plateau-teacher/ (commit them before a stop); a later run restores them when its
work directory has none and continues (fairseq-train restores checkpoint_last.pt; its early-stopping counter
restarts, the best score does not). When training ends, the best checkpoint's weights (no optimizer state)
go to artifacts/plateau/teacher.pt, it is scored on the test set (stock fairseq-generate, beam 5,
sacreBLEU), its record (command, per-epoch curve, test BLEU/chrF, sha256, its dictionary's sha256) is appended to
docs/plateau_results.json, and the in-flight copy is removed.
Every flag that defines the run is spelled out below (no fairseq default is relied on).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from kdexp import plateau
from kdexp.corpus import CorpusError
from kdexp.options import parse_args as demo_args
from kdexp.pipeline import REPO, Pipeline, StepFailed, sha256, tool
from kdexp.recipes import SIDES, prepare_data

# (full, quick) architecture: the demo's teacher (kdexp/options.py DEFAULTS)
ARCH = {"layers": (2, 1), "dim": (128, 32), "ffn": (512, 64), "heads": (4, 2)}
TEACHER = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--dropout", "0.1", "--attention-dropout", "0", "--activation-dropout", "0", "--weight-decay", "0",
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
           "--lr", "3e-3", "--lr-scheduler", "cosine", "--min-lr", "0", "--warmup-updates", "400",
           "--warmup-init-lr", "1e-07", "--max-tokens", "1500", "--required-batch-size-multiple", "8",
           "--num-workers", "0"]
EVAL_ARGS = {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}
EVAL_BLEU = ["--eval-bleu", "--eval-bleu-args", json.dumps(EVAL_ARGS), "--eval-bleu-detok", "space",
             "--eval-bleu-remove-bpe", "sentencepiece", "--best-checkpoint-metric", "bleu",
             "--maximize-best-checkpoint-metric"]
ARTIFACTS = os.path.join(REPO, "artifacts")
INFLIGHT_FILES = ("checkpoint_last.pt", "checkpoint_best.pt")


def arch_flags(quick):
    """--arch transformer with shared embeddings and the teacher's per-side shape."""
    col = 1 if quick else 0
    v = {k: str(x[col]) for k, x in ARCH.items()}
    out = ["--arch", "transformer", "--share-all-embeddings"]
    for side in SIDES:
        out += ["--%s-layers" % side, v["layers"], "--%s-embed-dim" % side, v["dim"],
                "--%s-ffn-embed-dim" % side, v["ffn"], "--%s-attention-heads" % side, v["heads"]]
    return out


def teacher_cmd(p, a, max_update):
    return [tool("fairseq-train"), p.path("data-bin"), "--source-lang", "de", "--target-lang", "en",
            "--seed", str(a.seed)] + arch_flags(a.quick) + TEACHER + EVAL_BLEU + [
            "--max-epoch", str(a.max_epoch), "--max-update", str(max_update), "--patience", str(a.patience),
            "--save-dir", p.path("ckpt", "teacher"), "--no-epoch-checkpoints",
            "--log-format", "simple", "--log-interval", "100"]


def inflight_dir(a):
    return os.path.join(ARTIFACTS, "inflight", "plateau-teacher") if not a.quick else os.path.join(a.work, "inflight")


def restore_inflight(p, a):
    """A committed in-flight run (artifacts/inflight) into an empty work directory."""
    src, dst = inflight_dir(a), p.path("ckpt", "teacher")
    if not os.path.isdir(src) or os.path.isfile(os.path.join(dst, "checkpoint_last.pt")):
        return
    os.makedirs(dst, exist_ok=True)
    for name in INFLIGHT_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    shutil.copy(os.path.join(src, "teacher.log"), p.path("logs", "teacher.log"))
    p.progress("teacher", "restored the in-flight run from %s" % src)


def snapshot(p, a):
    """Copy the in-flight run (checkpoints, log) to artifacts/inflight, for a commit before a stop."""
    src, dst = p.path("ckpt", "teacher"), inflight_dir(a)
    os.makedirs(dst, exist_ok=True)
    for name in INFLIGHT_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name + ".tmp"))
            os.replace(os.path.join(dst, name + ".tmp"), os.path.join(dst, name))
    shutil.copy(p.path("logs", "teacher.log"), os.path.join(dst, "teacher.log"))
    print("snapshot in %s (epoch %d)" % (dst, len(plateau.curve([p.path("logs", "teacher.log")], 0))))


def train_teacher(p, a, cmd):
    """fairseq-train until early stopping or the cap; appends to WORK/logs/teacher.log (a resumed run keeps
    its curve)."""
    done = p.path("done", "teacher-train.json")
    if os.path.isfile(done):
        p.progress("teacher", "trained (delete %s to train again)" % done)
        return
    log = p.path("logs", "teacher.log")
    start = time.time()
    with open(log, "a") as f:
        f.write("$ %s\n" % " ".join(cmd))
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=p.env)
    if rc != 0:
        raise StepFailed("teacher training failed (exit %d); log: %s" % (rc, log))
    with open(done, "w") as f:
        json.dump({"seconds_this_run": time.time() - start, "cmd": cmd}, f)


def weights_only(src, dst):
    """The checkpoint without optimizer state (what fairseq-generate and the KD task load; its small extra_state
    stays: fairseq's checkpoint upgrade reads it); returns sha256."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=False)
    state["last_optimizer_state"] = None
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    torch.save(state, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    return sha256(dst)


def finish(p, a, cmd):
    """Weights-only teacher (artifacts/plateau/teacher.pt; WORK/teacher-quick.pt with --quick), its test scores
    and its record (docs/plateau_results.json; WORK/teacher.json only with --quick); the in-flight copy removed."""
    dst = plateau.teacher_pt(p)
    sha = weights_only(p.path("ckpt", "teacher", "checkpoint_best.pt"), dst)
    bleu, chrf, _, gen = plateau.decode(p, dst, "beam5", "plateau-teacher")  # the students' decoding
    curve = plateau.curve([p.path("logs", "teacher.log")], plateau.token_rows(p)["gold"])
    record = {"method": "teacher", "seed": a.seed, "size": "teacher", "quick": a.quick, "teacher_sha256": sha,
              "checkpoint": os.path.relpath(dst, REPO), "command": plateau.relative(cmd), "threads": a.threads,
              "generate_command": plateau.relative(gen), "curve": curve, "epochs": len(curve),
              "best_epoch": max(curve, key=lambda c: c["valid_bleu"])["epoch"],
              "test_bleu": bleu, "test_chrf": chrf,
              "dictionary_sha256": sha256(p.path("data-bin", "dict.en.txt"))}  # what --plateau-teacher checks
    if not a.quick:
        records = [r for r in plateau.load_records() if r.get("method") != "teacher"]
        plateau.save_records([record] + records)
    with open(p.path("teacher.json"), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(inflight_dir(a), ignore_errors=True)
    p.progress("teacher", "test BLEU %.2f chrF %.2f; %s sha256 %s" % (bleu, chrf, dst, sha))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's --quick corpus and a tiny teacher")
    parser.add_argument("--work", default=None, help="work directory (default work/plateau[-quick])")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--patience", type=int, default=5, help="epochs without a new best validation BLEU")
    parser.add_argument("--max-epoch", type=int, default=30, help="cap on epochs = the cosine schedule's budget")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of training and scoring")
    parser.add_argument("--snapshot", action="store_true", help="copy the in-flight run to artifacts/inflight")
    a, data_flags = parser.parse_known_args(argv)  # the rest: the demo's data flags (--data, sizes), as tests use
    a.work = a.work or os.path.join(REPO, "work", "plateau-quick" if a.quick else "plateau")
    d = demo_args(["--work", a.work, "--threads", str(a.threads)] + (["--quick"] if a.quick else []) + data_flags)
    p = Pipeline(d)
    if a.snapshot:
        return snapshot(p, a)
    try:
        prepare_data(p)
        cmd = teacher_cmd(p, a, a.max_epoch * plateau.updates_per_epoch(p.path("data-bin"), 1500))
        restore_inflight(p, a)
        train_teacher(p, a, cmd)
        finish(p, a, cmd)
    except (StepFailed, CorpusError) as e:
        sys.exit("plateau_teacher: %s" % e)


if __name__ == "__main__":
    main()
