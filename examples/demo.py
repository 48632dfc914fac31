#!/usr/bin/env python3
"""End-to-end kd-plugin demo: a German->English teacher, then four equally-sized students trained with the
same budget (plain label smoothing, token-level KD, sentence-level KD, gated hybrid KD), all scored with stock
``fairseq-generate`` and sacreBLEU.

    make demo                          # .venv/bin/python examples/demo.py  (~25 min on 2 CPU cores)
    make demo-quick                    # QUICK=1: 3k-pair subset, tiny models (~5 min smoke test)
    python examples/demo.py --data my.tsv --students plain,token
    python examples/demo.py --help     # all sizes

Pipeline (every step is cached under WORK: delete a step's output or WORK/done/STEP.json to redo it):
corpus (examples/build_corpus.py) -> sentencepiece joint BPE -> fairseq-preprocess --joined-dictionary ->
teacher (fairseq-train) -> kd-distill-corpus (train, valid) -> students -> fairseq-generate + sacreBLEU ->
a markdown table printed and written to WORK/results.md (full mode also: docs/DEMO.md).
"""
import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_corpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's console scripts live next to its python
SRC, TGT = "de", "en"
SPLITS = ("train", "valid", "test")
# Output length cap of evaluation and distillation (1.2 * source + 10): keeps a weak model's degenerate
# repetitions from running to 200 tokens, which would dominate CPU decoding time.
MAX_LEN = ["--max-len-a", "1.2", "--max-len-b", "10"]

# Extra fairseq-train arguments of each student, formatted with {user_dir}, {teacher}, {distill}.
# "{teacher}" makes a student depend on the teacher checkpoint, "{distill}" on kd-distill-corpus's output.
KD_TASK = ["--user-dir", "{user_dir}", "--task", "translation_kd"]
STUDENTS = {
    "plain": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "token": KD_TASK + ["--teacher-path", "{teacher}", "--criterion", "token_kd",
                        "--kd-alpha", "0.5", "--kd-temperature", "1", "--label-smoothing", "0.1"],
    "sentence": KD_TASK + ["--teacher-targets", "{distill}", "--criterion", "sentence_kd",
                           "--label-smoothing", "0.1"],
    "hybrid": KD_TASK + ["--teacher-path", "{teacher}", "--teacher-targets", "{distill}",
                         "--criterion", "hybrid_kd", "--label-smoothing", "0.1"],
}
# Opt-in ablation (--students ...,hybrid-even): hybrid_kd with the gate fixed at 1/2, i.e. what the learned
# per-sentence gate is measured against (docs/GATE.md).
STUDENTS["hybrid-even"] = STUDENTS["hybrid"] + ["--kd-gate", "fixed:0.5"]
DEFAULT_STUDENTS = ("plain", "token", "sentence", "hybrid")
TEACHER_CRITERION = STUDENTS["plain"]

# Default sizes: (full, quick); 0 pairs = the whole split. Full mode on an idle 2-core machine (docs/DEMO.md):
# teacher 683 updates/epoch, 9.4-10.4 min for 3 epochs (24.2 BLEU); beam-2 distillation of train + valid 4.1 min
# (2 shards; beam 5: 10.1 min for +0.7 teacher BLEU); students two at a time, 9.3 min for all four with their
# test decoding (hybrid slowest: online teacher + two decoder passes). ~25 min in all.
DEFAULTS = {
    "bpe_size": (4000, 1000),
    "teacher_layers": (2, 1), "teacher_dim": (128, 64), "teacher_ffn": (512, 256), "teacher_heads": (4, 2),
    "student_layers": (1, 1), "student_dim": (64, 32), "student_ffn": (256, 64), "student_heads": (2, 2),
    "teacher_epochs": (3, 1), "student_epochs": (1, 1), "warmup": (400, 50), "distill_beam": (2, 2),
    "train_pairs": (0, 3000), "valid_pairs": (0, 200), "test_pairs": (0, 200),
}


class StepFailed(RuntimeError):
    pass


class Pipeline:
    """Runs the cached steps; ``self.seconds[step]`` is the wall time of each step (cached runs included),
    ``self.reused`` the steps skipped because an earlier run made them."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.t0 = time.time()
        self.seconds, self.reused = {}, []
        self.lock = threading.Lock()
        # unbuffered: stdout lines (fairseq-generate's H-i) never get split by stderr lines
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        for sub in ("logs", "done"):
            os.makedirs(self.path(sub), exist_ok=True)

    def with_threads(self, threads):
        """The same pipeline (shared step times) whose commands run with ``threads`` OpenMP threads."""
        view = copy.copy(self)
        view.env = dict(self.env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return view

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def progress(self, step, message):
        with self.lock:  # students report from parallel threads
            print("[%7.1fs] %-18s %s" % (time.time() - self.t0, step, message), flush=True)

    def cached(self, step):
        """The done-marker of ``step`` ({"seconds": ..., "cmd": ...}) or None."""
        marker = self.path("done", step + ".json")
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            return json.load(f)

    def step(self, step, fn, cmd=None):
        """Run ``fn()`` once: skipped when ``step``'s done-marker exists; the marker records time and command."""
        done = self.cached(step)
        if done is not None:
            self.seconds[step] = done["seconds"]
            self.reused.append(step)
            note = "" if cmd is None or done.get("cmd") == cmd else " (made with other arguments; delete %s)" \
                % self.path("done", step + ".json")
            self.progress(step, "cached (%.0fs)%s" % (done["seconds"], note))
            return
        self.progress(step, "running ...")
        start = time.time()
        fn()
        self.seconds[step] = time.time() - start
        with open(self.path("done", step + ".json"), "w") as f:
            json.dump({"seconds": self.seconds[step], "cmd": cmd}, f)
        self.progress(step, "done in %.0fs" % self.seconds[step])

    def run(self, step, *stages):
        """Step ``step``: each stage is a list of commands run in parallel (one command: a plain list);
        stages run one after the other. Output goes to WORK/logs/STEP.log (STEP.I.log for parallel ones)."""
        stages = [[cmd] if isinstance(cmd[0], str) else cmd for cmd in stages]
        stages = [[[str(c) for c in cmd] for cmd in stage] for stage in stages]
        self.step(step, lambda: [self.subprocesses(step, stage) for stage in stages], stages)

    def subprocesses(self, step, cmds):
        """Run ``cmds`` concurrently; raise StepFailed (after printing the log's tail) if one fails."""
        procs = []
        for i, cmd in enumerate(cmds):
            log = self.path("logs", "%s.log" % step if len(cmds) == 1 else "%s.%d.log" % (step, i))
            with open(log, "w") as f:
                f.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
                f.flush()
                procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                               env=self.env), log))
        failed = [(proc.wait(), log) for proc, log in procs]
        for rc, log in failed:
            if rc != 0:
                with open(log, errors="replace") as f:
                    sys.stderr.write("".join(f.readlines()[-30:]))
                raise StepFailed("step %s failed (exit %d); full log: %s" % (step, rc, log))


def tool(name):
    """A console script of the venv that runs this file."""
    exe = os.path.join(BIN, name)
    if not os.path.isfile(exe):
        raise StepFailed("%s not found next to %s (run `make setup`)" % (name, sys.executable))
    return exe


# ---------------------------------------------------------------- data


def make_corpus(p):
    """WORK/corpus/{train,valid,test}.{de,en}: LibreOffice help (or --data TSV), subsampled in quick mode."""
    a, out = p.args, p.path("corpus")
    subset = a.train_pairs or a.valid_pairs or a.test_pairs
    full = p.path("corpus-full") if subset else out
    build_corpus.build(full, a.cache, tsv=a.data, seed=a.seed,
                       log=lambda m: p.progress("corpus", m))
    if subset:
        limits = {"train": a.train_pairs, "valid": a.valid_pairs, "test": a.test_pairs}
        os.makedirs(out, exist_ok=True)
        for split in SPLITS:
            for lang in (SRC, TGT):
                lines = read_lines(os.path.join(full, "%s.%s" % (split, lang)))
                write_lines(os.path.join(out, "%s.%s" % (split, lang)), lines[:limits[split] or None])


def train_bpe(p):
    """Joint sentencepiece BPE on train.de + train.en; WORK/bpe/{split}.{lang} hold the pieces."""
    import sentencepiece as spm

    os.makedirs(p.path("bpe"), exist_ok=True)
    prefix = p.path("bpe", "spm")
    with open(p.path("logs", "bpe.log"), "w") as log:
        try:
            spm.SentencePieceTrainer.train(
                input=[p.path("corpus", "train.%s" % lang) for lang in (SRC, TGT)], model_prefix=prefix,
                vocab_size=p.args.bpe_size, model_type="bpe", character_coverage=1.0, num_threads=2,
                logstream=log)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
            raise StepFailed("step bpe failed (--bpe-size %d): %s" % (p.args.bpe_size, str(e).split("] ")[-1]))
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for split in SPLITS:
        for lang in (SRC, TGT):
            lines = read_lines(p.path("corpus", "%s.%s" % (split, lang)))
            write_lines(p.path("bpe", "%s.%s" % (split, lang)),
                        [" ".join(pieces) for pieces in sp.encode(lines, out_type=str)])


def preprocess_cmd(p):
    bpe = p.path("bpe")
    return [tool("fairseq-preprocess"), "--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary",
            "--trainpref", os.path.join(bpe, "train"), "--validpref", os.path.join(bpe, "valid"),
            "--testpref", os.path.join(bpe, "test"), "--destdir", p.path("data-bin"), "--workers", "2"]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    """Write atomically (temp file + rename) so an interrupted run never leaves a half file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- training


def model_args(a, role):
    """Architecture flags of the teacher or of the students (``role``), from --{role}-{layers,dim,ffn,heads}."""
    layers, dim, ffn, heads = (getattr(a, "%s_%s" % (role, k)) for k in ("layers", "dim", "ffn", "heads"))
    return ["--arch", "transformer", "--share-all-embeddings",
            "--encoder-layers", layers, "--decoder-layers", layers,
            "--encoder-embed-dim", dim, "--decoder-embed-dim", dim,
            "--encoder-ffn-embed-dim", ffn, "--decoder-ffn-embed-dim", ffn,
            "--encoder-attention-heads", heads, "--decoder-attention-heads", heads]


def train(p, name, role, criterion_args):
    """fairseq-train from scratch into WORK/ckpt/NAME (a clean start keeps the timings comparable)."""
    cmd = train_cmd(p, name, role, criterion_args)
    if p.cached("train-" + name) is None:
        shutil.rmtree(p.path("ckpt", name), ignore_errors=True)
    p.run("train-" + name, cmd)


def train_cmd(p, name, role, criterion_args):
    """One fairseq-train command line; only the architecture (``role``) and the criterion differ."""
    a = p.args
    cmd = [tool("fairseq-train"), p.path("data-bin"), "--source-lang", SRC, "--target-lang", TGT]
    cmd += model_args(a, role) + criterion_args
    cmd += ["--dropout", a.dropout, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
            "--lr", a.lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", a.warmup,
            "--warmup-init-lr", "1e-07", "--max-tokens", a.max_tokens,
            "--max-epoch", getattr(a, "%s_epochs" % role), "--seed", a.seed, "--num-workers", "0",
            "--save-dir", p.path("ckpt", name), "--no-epoch-checkpoints",
            "--log-format", "simple", "--log-interval", "50"]
    if a.max_update:
        cmd += ["--max-update", a.max_update]
    return cmd


def train_students(p):
    """Train and score every student, ``--jobs`` at a time with ``--threads`` (default: cores / jobs) threads
    each: small models use a second core better as a second process than as a second intra-op thread.
    Students that run the teacher online start first (they take longest). Returns {name: scores}."""
    a = p.args
    view = p.with_threads(student_threads(a))
    order = sorted(a.students, key=lambda s: "{teacher}" not in STUDENTS[s])  # stable: online teacher first

    def student(name):
        train(view, name, "student", student_args(view, name))
        result = evaluate(view, name)
        p.progress(name, "BLEU %.1f chrF %.1f" % (result["bleu"], result["chrf"]))
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {name: pool.submit(student, name) for name in order}
        try:
            return {name: futures[name].result() for name in a.students}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # students not started yet never start; running ones finish
            raise


def student_threads(a):
    return a.threads or max(1, len(os.sched_getaffinity(0)) // a.jobs)


def checkpoint(p, name):
    return p.path("ckpt", name, "checkpoint_last.pt")


def student_args(p, name):
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": checkpoint(p, "teacher"),
             "distill": p.path("distill")}
    return [arg.format(**paths) for arg in STUDENTS[name]]


def distill(p, split):
    """Teacher-decode ``split`` into WORK/distill: --distill-shards single-threaded shards run in parallel
    (on a small CPU much faster than one multi-threaded beam search), then merged."""
    exe, shards = tool("kd-distill-corpus"), p.args.distill_shards
    cmd = [exe, "--data", p.path("data-bin"), "--path", checkpoint(p, "teacher"), "--split", split,
           "--out", p.path("distill"), "--max-tokens", "4000", "--beam", p.args.distill_beam] + MAX_LEN
    if shards == 1:
        return p.run("distill-" + split, cmd + ["--overwrite"])
    p.run("distill-" + split,
          [cmd + ["--cpu-threads", "1", "--num-shards", shards, "--shard-id", i, "--overwrite"]
           for i in range(shards)],
          [exe, "merge", "--out", p.path("distill"), "--split", split, "--overwrite"])


def count_params(ckpt):
    """Parameters of the checkpoint's model (tensors shared by --share-all-embeddings counted once)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    seen, total = set(), 0
    for key, tensor in state.items():
        if not tensor.is_floating_point() or key.endswith("_float_tensor"):
            continue  # version counters and fairseq's dtype placeholders
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.numel()
    return total


# ---------------------------------------------------------------- evaluation


def generate_cmd(p, name):
    """STOCK fairseq-generate (no --user-dir): the students are plain fairseq transformers."""
    return [tool("fairseq-generate"), p.path("data-bin"), "--path", checkpoint(p, name),
            "--source-lang", SRC, "--target-lang", TGT, "--gen-subset", "test",
            "--beam", "5", "--batch-size", "64", "--remove-bpe", "sentencepiece"] + MAX_LEN


def hypotheses(log, n):
    """The n detokenized hypotheses of a fairseq-generate log, ordered by sentence id."""
    hyps = {}
    with open(log, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line.rstrip("\n"))
            if m:
                hyps[int(m.group(1))] = m.group(2)
    missing = [i for i in range(n) if i not in hyps]
    if missing:
        raise StepFailed("%s: no hypothesis for %d of %d test sentences (first: %d)"
                         % (log, len(missing), n, missing[0]))
    return [hyps[i] for i in range(n)]


def score(p, name):
    """sacreBLEU BLEU and chrF of the system's test hypotheses against the raw test.en."""
    from sacrebleu.metrics import BLEU, CHRF

    refs = read_lines(p.path("corpus", "test.%s" % TGT))
    hyps = hypotheses(p.path("logs", "eval-%s.log" % name), len(refs))
    os.makedirs(p.path("eval"), exist_ok=True)
    write_lines(p.path("eval", "%s.hyp" % name), hyps)
    bleu, chrf = BLEU(), CHRF()
    result = {"bleu": bleu.corpus_score(hyps, [refs]).score, "chrf": chrf.corpus_score(hyps, [refs]).score,
              "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
              "params": count_params(checkpoint(p, name)), "updates": trained_updates(p, name)}
    with open(p.path("eval", "%s.json" % name), "w") as f:
        json.dump(result, f)
    return result


def trained_updates(p, name):
    """The number of updates of the system's training run (from its fairseq-train log)."""
    with open(p.path("logs", "train-%s.log" % name), errors="replace") as f:
        found = re.findall(r"num_updates[ =](\d+)", f.read())
    return int(found[-1]) if found else 0


def evaluate(p, name):
    """Decode the test set (cached step) and score it (always: it takes a second)."""
    p.run("eval-" + name, generate_cmd(p, name))
    return score(p, name)


# ---------------------------------------------------------------- report


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "%d x %s (%s)" % (os.cpu_count() or 0, model, platform.platform())


def command_line(a):
    env = "QUICK=1 " if a.quick and os.environ.get("QUICK") else ""
    return env + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + sys.argv)


def report(p, results):
    """The markdown results: one table plus everything needed to reproduce it."""
    a = p.args
    teacher_train = p.seconds.get("train-teacher", 0.0)
    rows = ["| system | params | updates | train time (s) | BLEU | chrF |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = "teacher" if name == "teacher" else "student: " + name
        rows.append("| %s | %s | %d | %.0f | %.1f | %.1f |" % (
            label, "{:,}".format(r["params"]), r["updates"], p.seconds.get("train-" + name, 0.0), r["bleu"], r["chrf"]))
    distill = sum(p.seconds.get("distill-" + s, 0.0) for s in ("train", "valid"))
    sizes = {s: len(read_lines(p.path("corpus", "%s.%s" % (s, TGT)))) for s in SPLITS}
    first = next(iter(results.values()))
    lines = [
        "# kd-plugin demo: German -> English, LibreOffice help%s" % (" (QUICK smoke run)" if a.quick else ""),
        "",
        "\n".join(rows),
        "",
        "- Command: `%s`" % command_line(a),
        "- Date: %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "- Machine: %s; threads per process: teacher and its test decoding %d, distillation shards 1, students "
        "(training and test decoding) %d, %d students at a time"
        % (machine(), a.threads or _torch_threads(), student_threads(a), a.jobs),
        "- Data: %s; train %d / valid %d / test %d pairs; joint sentencepiece BPE %d"
        % ("`%s`" % a.data if a.data else "Debian libreoffice-help-de + libreoffice-help-en-us (MPL-2.0)",
           sizes["train"], sizes["valid"], sizes["test"], a.bpe_size),
        "- Teacher: transformer %s, %s epochs (%.0f s)" % (arch(a, "teacher"), a.teacher_epochs, teacher_train),
        "- Students (all): transformer %s, %s epochs, same seed, lr and --max-tokens (students that train on "
        "teacher-decoded targets batch by those targets' lengths, so their update counts differ)"
        % (arch(a, "student"), a.student_epochs),
        "- Shared: adam lr %s, inverse_sqrt warmup %s, max-tokens %s, dropout %s, seed %s%s"
        % (a.lr, a.warmup, a.max_tokens, a.dropout, a.seed, ", max-update %s" % a.max_update if a.max_update else ""),
        "- Student criteria: %s" % "; ".join("%s: `%s`" % (s, " ".join(map(repo_relative, student_args(p, s))))
                                             for s in a.students),
    ]
    if distill:
        lines.append("- Teacher distillation of train+valid (kd-distill-corpus, beam %d): %.0f s, "
                     "not included in the sentence/hybrid train times" % (a.distill_beam, distill))
    wall = time.time() - p.t0
    reused = "; steps reused from earlier runs (not in this time): %s" % ", ".join(p.reused) if p.reused else ""
    lines += [
        "- Wall time of this run: %.0f s (%.1f min)%s" % (wall, wall / 60, reused),
        "- Decoding: stock `%s` (no --user-dir)" % " ".join(map(repo_relative, generate_cmd(p, "SYSTEM"))),
        "- sacreBLEU: BLEU `%s`, chrF `%s`" % (first["bleu_signature"], first["chrf_signature"]),
        "",
    ]
    return "\n".join(lines)


def arch(a, role):
    return "layers %s+%s, d=%s, ffn %s, %s heads" % tuple(
        getattr(a, "%s_%s" % (role, k)) for k in ("layers", "layers", "dim", "ffn", "heads"))


def repo_relative(arg):
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg


def _torch_threads():
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    quick = bool(os.environ.get("QUICK")) or "--quick" in (argv if argv is not None else sys.argv[1:])
    column = 1 if quick else 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=quick,
                        help="smoke run (also QUICK=1): 3k-pair subset, tiny models, scores meaningless")
    parser.add_argument("--work", default=os.path.join(REPO, "work", "demo-quick" if quick else "demo"),
                        help="work directory")
    parser.add_argument("--data", default=os.environ.get("DATA") or None,
                        help="de<TAB>en corpus to use instead of the LibreOffice help (also DATA=file.tsv)")
    parser.add_argument("--cache", default=os.path.join(REPO, "work", "cache"),
                        help="download cache of examples/build_corpus.py")
    parser.add_argument("--students", default=",".join(DEFAULT_STUDENTS),
                        help="comma-separated, from %s" % list(STUDENTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--distill-shards", type=int, default=min(len(os.sched_getaffinity(0)), 8),
                        help="parallel single-threaded kd-distill-corpus processes")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of training/decoding (0: torch's default for the teacher and "
                             "decoding, cores / --jobs for each student; 1 on a busy machine)")
    parser.add_argument("--jobs", type=int, default=min(len(os.sched_getaffinity(0)), 4),
                        help="students trained (and scored) at the same time")
    parser.add_argument("--max-update", type=int, default=0, help="stop every training here too (0: epochs only)")
    for key, values in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=values[column])
    a = parser.parse_args(argv)
    a.work, a.cache = os.path.abspath(a.work), os.path.abspath(a.cache)
    a.data = a.data and os.path.abspath(a.data)
    a.students = [s for s in a.students.split(",") if s]
    unknown = [s for s in a.students if s not in STUDENTS]
    if unknown:
        parser.error("--students: unknown %s (choose from %s)" % (unknown, ", ".join(STUDENTS)))
    if a.jobs < 1:
        parser.error("--jobs must be >= 1 (got %d)" % a.jobs)
    return a


def main(argv=None):
    a = parse_args(argv)
    p = Pipeline(a)
    p.progress("demo", "work directory %s (%s mode)" % (p.work, "QUICK" if a.quick else "full"))
    try:
        p.step("corpus", lambda: make_corpus(p))
        p.step("bpe", lambda: train_bpe(p))
        p.run("preprocess", preprocess_cmd(p))
        train(p, "teacher", "teacher", TEACHER_CRITERION)
        results = {"teacher": evaluate(p, "teacher")}
        p.progress("teacher", "BLEU %.1f chrF %.1f" % (results["teacher"]["bleu"], results["teacher"]["chrf"]))
        if any("{distill}" in arg for s in a.students for arg in STUDENTS[s]):
            for split in ("train", "valid"):
                distill(p, split)
        results.update(train_students(p))
    except (StepFailed, build_corpus.CorpusError) as e:
        sys.exit("demo: %s" % e)
    text = report(p, results)
    write_lines(p.path("results.md"), text.split("\n"))
    if not a.quick:
        os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
        write_lines(os.path.join(REPO, "docs", "DEMO.md"), text.split("\n"))
    print("\n" + text)
    p.progress("demo", "finished; results in %s%s" % (p.path("results.md"), "" if a.quick else " and docs/DEMO.md"))
    if not a.quick and results["teacher"]["bleu"] < 20:
        print("warning: the teacher reached only %.1f BLEU (expected >= 20)" % results["teacher"]["bleu"])
    if any(r["params"] >= results["teacher"]["params"] for name, r in results.items() if name != "teacher"):
        print("warning: the students are not smaller than the teacher (see --student-* and --teacher-*)")


if __name__ == "__main__":
    main()
