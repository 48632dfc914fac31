"""The plateau study's runs (issue 28; examples/plateau.py drives them, docs/PLATEAU.md reports them).

Regime: the demo's corpus, the committed plateau teacher (artifacts/plateau/teacher.pt, examples/plateau_teacher.py)
and the demo's student (1+1 layers, d=64, ffn 256, 2 heads, shared embeddings). Every student run trains with
the same schedule and stopping rule: a cosine learning rate from 3e-3 (400 warm-up updates) to 0 over a budget of
BUDGET_EPOCHS epochs of gold batches (``--max-update``, the cap: equal updates for every method but hybrid-half,
whose budget is half), validation BLEU
(greedy, fairseq's --eval-bleu) after every epoch, the best checkpoint by it, and early stopping after PATIENCE
epochs without a new best. A record per finished run (one JSON line in docs/plateau_results.json): its command,
the per-epoch curve (updates, wall seconds at one thread, cumulative student token-rows, valid loss and BLEU),
the best checkpoint decoded on the test set by beam 5 (test_bleu / test_chrf, and the per-sentence BLEU
statistics the paired bootstrap needs), greedy and sampling, and beam-5 test BLEU at epochs 2, 4, 8, 16, 32.

Token-rows: target positions the student's decoder runs forward and backward, per epoch the target tokens of
the data it trains on: the gold targets (plain, token), the teacher's (sentence), both (hybrid: its two passes).
"""
import json
import os
import re
import shutil
import subprocess
import time

from kdexp import configs, plateau_records, recipes
from kdexp.options import PLATEAU_RECORDS as RESULTS
from kdexp.pipeline import REPO, StepFailed, read_lines, sha256, tool

ARTIFACTS = os.path.join(REPO, "artifacts")
FIXED_EPOCHS = (2, 4, 8, 16, 32)
BUDGET_EPOCHS = {False: 40, True: 3}  # the cosine budget (and cap) in epochs of gold batches
PATIENCE = 5
STUDENT = {"layers": (1, 1), "dim": (64, 32), "ffn": (256, 64), "heads": (2, 2)}  # (full, quick)
EVAL = {"beam": 1, "max_len_a": 1.2, "max_len_b": 10}
DECODINGS = {"beam5": ["--beam", "5"], "greedy": ["--beam", "1"],
             "sampling": ["--beam", "1", "--sampling", "--temperature", "1", "--seed", "1"]}
METHODS = {
    "plain": configs.plain(),
    "token": configs.token_kd(configs.KD_TASK + configs.CACHED, configs.CACHE_TOPK),
    "sentence": configs.sentence_kd(configs.KD_TASK + configs.TARGETS),
    "hybrid": configs.hybrid_kd(configs.KD_TASK + configs.CACHED + configs.TARGETS, configs.CACHE_TOPK, "fixed:0.5"),
    "hybrid-gate": configs.hybrid_kd(configs.KD_TASK + configs.CACHED + configs.TARGETS, configs.CACHE_TOPK,
                                     "sentence"),
}
# hybrid-half: the hybrid with the cosine budget (and cap) halved, so that it ends at plain's and token's student
# compute (its two passes: ~2x their token-rows per epoch) with its learning rate annealed like theirs
METHODS["hybrid-half"] = METHODS["hybrid"]
BUDGET_SHARE = {"hybrid-half": 0.5}
# the on-policy stage (#22) ran from each seed's token best checkpoint (one epoch of on_policy_kd at share 1 and
# 1/2 and of token_kd); on_policy_kd lost and left the package (kd_plugin.retired): its records stay, and
# plateau_report reports them with the commit that last had it


def teacher_pt(p):
    """The plateau teacher's weights: committed (artifacts/plateau/teacher.pt), or WORK's with --quick."""
    return p.path("teacher-quick.pt") if p.args.quick else os.path.join(ARTIFACTS, "plateau", "teacher.pt")


def inflight(p, *parts):
    """Where in-flight runs are kept across a stop: committed (artifacts/inflight/plateau), or WORK's."""
    root = p.path("inflight") if p.args.quick else os.path.join(ARTIFACTS, "inflight", "plateau")
    return os.path.join(root, *parts)


def optimization(max_tokens, schedule="cosine"):
    """Every optimization flag of a student run (``schedule``: the study's cosine, or the calibration's
    inverse_sqrt, which the schedule pair compares it with)."""
    lr = ["--lr-scheduler", "cosine", "--min-lr", "0"] if schedule == "cosine" else ["--lr-scheduler", "inverse_sqrt"]
    return ["--dropout", "0.1", "--attention-dropout", "0", "--activation-dropout", "0", "--weight-decay", "0",
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0", "--lr", "3e-3"] + lr + [
            "--warmup-updates", "400", "--warmup-init-lr", "1e-07", "--max-tokens", str(max_tokens),
            "--required-batch-size-multiple", "8", "--num-workers", "0"]


def arch(quick):
    v = {k: str(x[1 if quick else 0]) for k, x in STUDENT.items()}
    out = ["--arch", "transformer", "--share-all-embeddings"]
    for side in recipes.SIDES:
        out += ["--%s-layers" % side, v["layers"], "--%s-embed-dim" % side, v["dim"],
                "--%s-ffn-embed-dim" % side, v["ffn"], "--%s-attention-heads" % side, v["heads"]]
    return out


def early_stopping():
    return ["--eval-bleu", "--eval-bleu-args", json.dumps(EVAL), "--eval-bleu-detok", "space",
            "--eval-bleu-remove-bpe", "sentencepiece", "--best-checkpoint-metric", "bleu",
            "--maximize-best-checkpoint-metric", "--patience", str(PATIENCE)]


def paths(p):
    return {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": recipes.checkpoint(p, "teacher"),
            "distill": p.path("distill"), "cache": p.path("cache%d" % configs.CACHE_TOPK)}


def run_key(method, seed):
    return "%s-s%d" % (method, seed)


def train_cmd(p, key, config, seed, max_tokens, stop, extra=()):
    """The fairseq-train command of run ``key``, every flag that defines it spelled out; ``stop``: its
    schedule and caps (a list of flags)."""
    flags = [str(x).format(**paths(p)) for x in config.flags()]
    return [tool("fairseq-train"), p.path("data-bin"), "--source-lang", "de", "--target-lang", "en",
            "--seed", str(seed)] + arch(p.args.quick) + flags + list(stop) + list(extra) + \
        ["--save-dir", p.path("ckpt", key), "--log-format", "simple", "--log-interval", "100"]


INVERSE_SQRT_CAP = 60  # epochs: the schedule pair's inverse_sqrt run


def stop_reason(points, budget, schedule):
    """"cap" when the run reached its cap (cosine: the update budget; inverse_sqrt: INVERSE_SQRT_CAP epochs),
    else "patience" (early stopping on validation BLEU)."""
    capped = points[-1]["updates"] >= budget if schedule == "cosine" else len(points) >= INVERSE_SQRT_CAP
    return "cap" if capped else "patience"


def plateau_stop(max_tokens, budget, schedule="cosine"):
    """The study's schedule and stopping rule: cosine over ``budget`` updates (the cap), early stopping on
    validation BLEU; the schedule pair's inverse_sqrt instead runs until early stopping or 60 epochs."""
    caps = ["--max-update", str(budget), "--max-epoch", "0"] if schedule == "cosine" else \
        ["--max-update", "0", "--max-epoch", str(INVERSE_SQRT_CAP)]
    return optimization(max_tokens, schedule) + caps + early_stopping()


def updates_per_epoch(data_bin, max_tokens, multiple=8):
    """Batches of fairseq-train's training epoch (the same batching: translation task, --max-tokens,
    --required-batch-size-multiple, fairseq's default max positions)."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    task = TranslationTask.setup_task(TranslationConfig(
        data=data_bin, source_lang="de", target_lang="en", dataset_impl="mmap"))
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=max_tokens, max_positions=(1024, 1024),
                                  required_batch_size_multiple=multiple, seed=1)
    return len(itr)


def token_rows(p):
    """Target tokens per epoch of the gold and of the teacher-decoded training targets."""
    from fairseq.data import data_utils

    from kd_plugin.data.kd_dataset import teacher_targets_prefix

    prefixes = {"gold": p.path("data-bin", "train.de-en.en")}
    if os.path.isdir(p.path("distill")):
        prefixes["teacher"] = teacher_targets_prefix(p.path("distill"), "train", "de", "en")
    out = {}
    for name, prefix in prefixes.items():
        ds = data_utils.load_indexed_dataset(prefix, None)  # held while its sizes (a view of its mmap) are read
        out[name] = int(ds.sizes.sum())
        del ds
    return out


def rows_per_epoch(method, rows):
    if method.startswith("hybrid"):
        return rows["gold"] + rows.get("teacher", 0)
    return rows.get("teacher", 0) if method == "sentence" else rows["gold"]


VALID_RE = re.compile(r"\| (\w+) ([-\d.e+]+)")


def curve(logs, rows):
    """[{epoch, updates, wall, token_rows, valid_loss, valid_nll_loss, valid_bleu}] from a run's fairseq-train
    logs, earlier parts first (a resumed run's repeated epoch keeps its last line). wall: seconds of training
    since the run began, None if the epoch ended without its summary line. fairseq's own wall clock restarts
    with each process, so a resumed part's clock is offset by the run's wall at the epoch it resumed from (the
    part of an epoch lost to a stop is not counted)."""
    out, wall = {}, {}
    for log in logs:
        part = {}
        for line in open(log, errors="replace"):
            if "| valid on 'valid' subset" in line:
                v = dict(VALID_RE.findall(line))
                e = int(v["epoch"])
                out[e] = {"epoch": e, "updates": int(v["num_updates"]), "token_rows": e * rows,
                          "valid_loss": float(v["loss"]), "valid_nll_loss": float(v["nll_loss"]),
                          "valid_bleu": float(v["bleu"])}
            elif "| train | epoch" in line:  # the epoch's summary: fairseq's wall clock since this process began
                v = dict(VALID_RE.findall(line))
                part[int(line.split("| train | epoch")[1].split()[0])] = float(v["wall"])
        if part:
            offset = wall.get(min(part) - 1, 0.0)
            wall.update({e: w + offset for e, w in part.items()})
    return [dict(out[k], wall=wall.get(k)) for k in sorted(out)]


def decode(p, ckpt, decoding, name):
    """Stock fairseq-generate of the test set -> (BLEU, chrF, per-sentence BLEU statistics, command)."""
    from sacrebleu.metrics import BLEU, CHRF

    cmd = [tool("fairseq-generate"), p.path("data-bin"), "--path", ckpt, "--source-lang", "de",
           "--target-lang", "en", "--gen-subset", "test", "--batch-size", "64", "--nbest", "1",
           "--remove-bpe", "sentencepiece"] + DECODINGS[decoding] + recipes.MAX_LEN
    step = "decode-%s-%s" % (name, decoding)
    p.subprocesses(step, [[str(x) for x in cmd]])
    log = p.path("logs", step + ".log")
    refs = read_lines(p.path("corpus", "test.en"))
    hyps = recipes.hypotheses(log, len(refs))
    bleu = BLEU()
    stats = [[int(x) for x in s] for s in bleu._extract_corpus_statistics(hyps, [refs])]
    return bleu.corpus_score(hyps, [refs]).score, CHRF().corpus_score(hyps, [refs]).score, stats, cmd


def relative(cmd):
    return [os.path.relpath(x, REPO) if isinstance(x, str) and x.startswith(REPO + os.sep) else x for x in cmd]


def decode_run(p, ckpt_dir, name):
    """The decoding axis of the best checkpoint, each decoding with its per-sentence BLEU statistics for the
    paired bootstrap (beam 5's as the record's ``bleu_stats``), and beam-5 BLEU at the fixed epochs reached."""
    out, best = {"decoding": {}}, os.path.join(ckpt_dir, "checkpoint_best.pt")
    for decoding in DECODINGS:
        bleu, chrf, stats, cmd = decode(p, best, decoding, name)
        out["decoding"][decoding] = {"bleu": bleu, "chrf": chrf, "command": relative(cmd)}
        if decoding == "beam5":
            out.update(test_bleu=bleu, test_chrf=chrf, bleu_stats=stats)
        else:
            out["decoding"][decoding]["bleu_stats"] = stats
    out["fixed_epochs"] = {}
    for e in FIXED_EPOCHS:
        ckpt = os.path.join(ckpt_dir, "checkpoint%d.pt" % e)
        if os.path.isfile(ckpt):
            out["fixed_epochs"][str(e)] = decode(p, ckpt, "beam5", "%s-e%d" % (name, e))[0]
    return out


def train(p, key, cmd):
    """fairseq-train into WORK/logs/train-KEY.log (the log of an earlier, resumed part is kept as
    train-KEY.N.log and read first); wall seconds."""
    log = p.path("logs", "train-%s.log" % key)
    if os.path.isfile(log):
        os.replace(log, p.path("logs", "train-%s.%d.log" % (key, len(train_logs(p, key)))))
    start = time.time()
    p.subprocesses("train-" + key, [[str(x) for x in cmd]])
    return time.time() - start


def trained(p, key):
    """True when the run's last training log says fairseq-train ended ("done training") and its best checkpoint
    is there."""
    logs = train_logs(p, key)
    return bool(logs) and os.path.isfile(p.path("ckpt", key, "checkpoint_best.pt")) and \
        "| done training in " in open(logs[-1], errors="replace").read()


def train_logs(p, key):
    """A run's training logs, earlier parts first."""
    parts = sorted((f for f in os.listdir(p.path("logs")) if re.match(r"train-%s\.\d+\.log$" % re.escape(key), f)),
                   key=lambda f: int(f.rsplit(".", 2)[1]))
    current = p.path("logs", "train-%s.log" % key)
    return [p.path("logs", f) for f in parts] + ([current] if os.path.isfile(current) else [])


def student_run(p, method, seed, budget, max_tokens, rows, schedule="cosine"):
    """Train one student to its plateau (``schedule`` "cosine": the study's; "inverse_sqrt": the schedule
    pair's other run, recorded as method "schedule-inverse_sqrt"), decode it, return its record. Its checkpoints
    are deleted."""
    key = run_key(method if schedule == "cosine" else "schedule-" + schedule, seed)
    budget = int(budget * BUDGET_SHARE.get(method, 1))
    cmd = train_cmd(p, key, METHODS[method], seed, max_tokens, plateau_stop(max_tokens, budget, schedule))
    restore_inflight(p, key)
    # a run whose training ended before a stop cut its decoding is not trained again (fairseq does not keep its
    # early-stopping count across processes: a resumed finished run would train more epochs)
    seconds = 0.0 if trained(p, key) else train(p, key, cmd)
    points = curve(train_logs(p, key), rows_per_epoch(method, rows))
    record = {"method": key.rsplit("-s", 1)[0], "seed": seed, "size": "centre", "teacher_sha256": sha256(teacher_pt(p)),
              "command": relative(cmd), "threads": 1, "max_tokens": max_tokens, "schedule": schedule,
              "budget_updates": budget if schedule == "cosine" else None, "curve": points,
              "seconds_last_session": round(seconds, 1),
              "stopped": stop_reason(points, budget, schedule),
              "best_epoch": max(points, key=lambda c: c["valid_bleu"])["epoch"]}
    record.update(decode_run(p, p.path("ckpt", key), key))
    shutil.rmtree(p.path("ckpt", key), ignore_errors=True)
    shutil.rmtree(inflight(p, key), ignore_errors=True)
    return record


def scenario(p):
    """The study's scenario as kd-advise measures it (its signals: capacity ratio, source length, rare subwords,
    teacher entropy/confidence/NLL, beam decoding), so that kd-advise can say how far a user's scenario is from
    the one the plateau answer was measured on. A record: {"method": "scenario", "seed": 0, ...}."""
    cmd = [tool("kd-advise"), "--data", p.path("data-bin"), "--source-lang", "de", "--target-lang", "en",
           "--teacher", recipes.checkpoint(p, "teacher"), "--student-arch", " ".join(arch(p.args.quick)),
           "--split", "train", "--sample", "500", "--seed", "1", "--beam", "5", "--cpu", "--json"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=p.env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise StepFailed("kd-advise failed on the plateau scenario: %s" % last)
    measured = json.loads(out.stdout)
    return {"method": "scenario", "seed": 0, "teacher_sha256": sha256(teacher_pt(p)), "command": relative(cmd),
            "signals": measured["signals"], "student_params": measured["info"]["student_params"],
            "teacher_params": measured["info"]["teacher_params"]}


def restore_inflight(p, key):
    """A run's committed in-flight copy (checkpoints and log) into an empty work directory."""
    src, dst = inflight(p, key), p.path("ckpt", key)
    if not os.path.isdir(src) or os.path.isfile(os.path.join(dst, "checkpoint_last.pt")):
        return
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):  # train.N.log: the parts of its log, in order
        target = p.path("logs", "train-%s.%s" % (key, name[len("train."):])) if name.endswith(".log") \
            else os.path.join(dst, name)
        shutil.copy(os.path.join(src, name), target)


def snapshot(p, key):
    """Copy an in-flight run (checkpoint_last, best, the fixed epochs' checkpoints, its log) to artifacts/."""
    src, dst = p.path("ckpt", key), inflight(p, key)
    keep = ["checkpoint_last.pt", "checkpoint_best.pt"] + ["checkpoint%d.pt" % e for e in FIXED_EPOCHS]
    os.makedirs(dst, exist_ok=True)
    for name in keep:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    for i, log in enumerate(train_logs(p, key)):
        shutil.copy(log, os.path.join(dst, "train.%d.log" % i))
    return dst


def load_records(path=RESULTS):
    return plateau_records.load_records(path)


def save_records(records, path=RESULTS):
    plateau_records.save_records(records, path)


def recorded(records, method, seed):
    return any(r["method"] == method and r["seed"] == seed for r in records)
