#!/usr/bin/env python3
"""End-to-end kd-plugin demo: a German->English teacher (or any pair with --data), then four equally-sized
students trained with the same budget (plain label smoothing, token-level KD, sentence-level KD, hybrid KD;
the token-level signals from a top-8 teacher cache), all scored with stock ``fairseq-generate`` and
sacreBLEU, exported to CTranslate2 int8 and timed on the test set (both paths, one thread).

    make demo                          # .venv/bin/python examples/demo.py  (~20 min on 2 CPU cores)
    make demo-quick                    # QUICK=1: 3k-pair subset, tiny models (~5 min smoke test)
    python examples/demo.py --data fr-en.tsv --src-lang fr --tgt-lang en --students plain,token
    python examples/demo.py --help     # all sizes

Pipeline (every step is cached under WORK: delete a step's output or WORK/done/STEP.json to redo it):
corpus (examples/build_corpus.py: cleaned, split) -> sentencepiece joint BPE (demo_data.py) ->
fairseq-preprocess --joined-dictionary -> teacher (fairseq-train) -> kd-distill-corpus (train, valid) ->
kd-dump-teacher top-8 cache (train, valid) -> students -> fairseq-generate + sacreBLEU, kd-export int8 ->
speed phase (demo_speed.py) -> a markdown table (demo_report.py) printed and written to
WORK/results.md; a full run on the default corpus also writes docs/DEMO.md (a --data run never does).
Steps run through demo_pipeline.py. A malformed --data TSV (or too few pairs for the split) stops before
anything is written: one line naming the file, exit status 2.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_corpus  # noqa: E402
from demo_data import check_user_corpus, corpus_step_cmd, make_corpus, preprocess_cmd, train_bpe  # noqa: E402
from demo_pipeline import REPO, Pipeline, StepFailed, read_lines, tool, write_lines  # noqa: E402,F401
from demo_report import repo_relative, report  # noqa: E402
from demo_speed import export, inference_columns  # noqa: E402

LANG_RE = re.compile(r"^[A-Za-z0-9_]+$")  # fairseq names files {split}.{src}-{tgt}.{lang}
# Output length cap of evaluation and distillation (1.2 * source + 10): keeps a weak model's degenerate
# repetitions from running to 200 tokens, which would dominate CPU decoding time.
MAX_LEN = ["--max-len-a", "1.2", "--max-len-b", "10"]

# Extra fairseq-train arguments of each student, formatted with {user_dir}, {teacher}, {distill}, {cache}.
# "{teacher}" makes a student depend on the teacher checkpoint (online teacher), "{distill}" on
# kd-distill-corpus's output, "{cache}" on kd-dump-teacher's top-CACHE_TOPK cache (dump_cache).
# Every flag of each student's criterion is spelled out, so that no student depends on a criterion default.
KD_TASK = ["--user-dir", "{user_dir}", "--task", "translation_kd"]
CACHE_TOPK = 8
LS = ["--label-smoothing", "0.1"]
CACHED = ["--teacher-cache", "{cache}"]
ONLINE = ["--teacher-path", "{teacher}"]


def token_flags(topk):
    """token_kd's flags (also hybrid_kd's token-level half): forward KL at T = 1, alpha 1/2, every token."""
    return ["--kd-alpha", "0.5", "--kd-temperature", "1", "--kd-divergence", "forward_kl", "--kd-js-beta", "0.5",
            "--kd-skew-lambda", "0.1", "--kd-topk", str(topk), "--kd-select", "all", "--kd-select-rate", "0.5",
            "--kd-select-queue", "30000"]


# kd-distill-corpus's engines: CTranslate2 (float32 conversion of the teacher) decodes the demo's training
# split several times faster than fairseq at the same students' BLEU (docs/DISTILL.md), so it is the default
DISTILL_ENGINES = {"ctranslate2": ["--engine", "ctranslate2", "--ct2-quantization", "float32"],
                   "fairseq": ["--engine", "fairseq"]}

# hybrid_kd's weight g(x) fixed at 1/2 (the learned gate's settings given too, unused by a fixed gate)
HYBRID_GATE = ["--kd-gate", "fixed:0.5", "--kd-gate-tau", "1", "--kd-gate-weight", "1", "--kd-gate-momentum", "0.99",
               "--kd-gate-hidden", "64"]
TOKEN_KD = ["--criterion", "token_kd"]
HYBRID_KD = ["--teacher-targets", "{distill}", "--criterion", "hybrid_kd"]
STUDENTS = {
    "plain": ["--criterion", "label_smoothed_cross_entropy"] + LS,
    "token": KD_TASK + CACHED + TOKEN_KD + token_flags(CACHE_TOPK) + LS,
    "sentence": KD_TASK + ["--teacher-targets", "{distill}", "--criterion", "sentence_kd", "--kd-gold-mix", "0"] + LS,
    "hybrid": KD_TASK + CACHED + HYBRID_KD + token_flags(CACHE_TOPK) + HYBRID_GATE + LS,
    # opt-in (--students ...): the full-vocabulary signals from the teacher run online (slower)
    "token-online": KD_TASK + ONLINE + TOKEN_KD + token_flags(0) + LS,
    "hybrid-online": KD_TASK + ONLINE + HYBRID_KD + token_flags(0) + HYBRID_GATE + LS,
}
DEFAULT_STUDENTS = ("plain", "token", "sentence", "hybrid")
TEACHER_CRITERION = STUDENTS["plain"]

# Default sizes: (full, quick); 0 pairs = the whole split. Their measured cost (train time of each system, the
# distillation, the run's wall time, with the command and the machine): docs/DEMO.md.
DEFAULTS = {
    "bpe_size": (4000, 1000),
    "teacher_layers": (2, 1), "teacher_dim": (128, 64), "teacher_ffn": (512, 256), "teacher_heads": (4, 2),
    "student_layers": (1, 1), "student_dim": (64, 32), "student_ffn": (256, 64), "student_heads": (2, 2),
    "teacher_epochs": (3, 1), "student_epochs": (2, 1), "warmup": (400, 50), "distill_beam": (2, 2),
    "train_pairs": (0, 3000), "valid_pairs": (0, 200), "test_pairs": (0, 200), "speed_reps": (2, 1),
}
HELP = {"speed_reps": "rounds of the speed phase (demo_speed.py: interleaved, the median is reported)"}
# Per-side shapes: --{role}-{encoder,decoder}-{layers,ffn}, default --{role}-layers / --{role}-ffn
SIDES = ("encoder", "decoder")


# ---------------------------------------------------------------- training


def shape(a, role):
    """{key: value} of a role's architecture: dim, heads and {encoder,decoder}_{layers,ffn}."""
    out = {k: getattr(a, "%s_%s" % (role, k)) for k in ("dim", "heads")}
    for side in SIDES:
        for k in ("layers", "ffn"):
            out["%s_%s" % (side, k)] = getattr(a, "%s_%s_%s" % (role, side, k), None) or getattr(a, "%s_%s" % (role, k))
    return out


def model_args(a, role):
    """Architecture flags of the teacher or of the students (``role``), from --{role}-{dim,heads} and
    --{role}-{encoder,decoder}-{layers,ffn} (default --{role}-layers, --{role}-ffn)."""
    s, out = shape(a, role), ["--arch", "transformer", "--share-all-embeddings"]
    for flag, key in (("layers", "%s_layers"), ("embed-dim", "dim"), ("ffn-embed-dim", "%s_ffn"),
                      ("attention-heads", "heads")):  # the order of earlier runs' commands (cached steps)
        out += [x for side in SIDES for x in ("--%s-%s" % (side, flag), s[key.replace("%s", side)])]
    return out


def train(p, name, role, criterion_args):
    """fairseq-train from scratch into WORK/ckpt/NAME (a clean start keeps the timings comparable)."""
    cmd = train_cmd(p, name, role, criterion_args)
    if p.cached("train-" + name) is None:
        shutil.rmtree(p.path("ckpt", name), ignore_errors=True)
    p.run("train-" + name, cmd)


def train_cmd(p, name, role, criterion_args):
    """One fairseq-train command line; only the architecture (``role``) and the criterion differ."""
    a = p.args
    cmd = [tool("fairseq-train"), p.path("data-bin"), "--source-lang", a.src_lang, "--target-lang", a.tgt_lang]
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


def prepare_data(p):
    """The cached data steps: corpus, sentencepiece BPE, fairseq-preprocess."""
    p.step("corpus", lambda: make_corpus(p), corpus_step_cmd(p.args))
    p.step("bpe", lambda: train_bpe(p))
    p.run("preprocess", preprocess_cmd(p))


def build_teacher(p):
    """The data steps and the demo's teacher (cached steps; every driver shares them)."""
    prepare_data(p)
    train(p, "teacher", "teacher", TEACHER_CRITERION)


def train_students(p):
    """Train and score every student, ``--jobs`` at a time with ``--threads`` (default: cores / jobs) threads
    each: small models use a second core better as a second process than as a second intra-op thread.
    The costliest students start first (cost_rank). Each is exported (kd-export int8) after its scoring.
    Returns {name: scores}."""
    a = p.args
    view = p.with_threads(student_threads(a))
    order = sorted(a.students, key=cost_rank)  # stable

    def student(name):
        train(view, name, "student", student_args(view, name))
        result = evaluate(view, name)
        p.progress(name, "BLEU %.1f chrF %.1f" % (result["bleu"], result["chrf"]))
        export(view, name, checkpoint(view, name))
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {name: pool.submit(student, name) for name in order}
        try:
            return {name: futures[name].result() for name in a.students}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # students not started yet never start; running ones finish
            raise


def cost_rank(name):
    """Start-order key: minus the teacher signals a student reads (the online teacher counts twice, the
    cache, the distilled targets and hybrid_kd's second decoder pass once each): costliest first."""
    args = " ".join(STUDENTS[name])
    return -(2 * ("{teacher}" in args) + ("{cache}" in args) + ("{distill}" in args) + ("hybrid_kd" in args))


def student_threads(a):
    return a.threads or max(1, len(os.sched_getaffinity(0)) // a.jobs)


def checkpoint(p, name):
    return p.path("ckpt", name, "checkpoint_last.pt")


def student_args(p, name):
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": checkpoint(p, "teacher"),
             "distill": p.path("distill"), "cache": p.path("cache%d" % CACHE_TOPK)}
    return [str(arg).format(**paths) for arg in STUDENTS[name]]


def needs(students, placeholder):
    return any(placeholder in arg for s in students for arg in STUDENTS[s])


def distill(p, split):
    """Teacher-decode ``split`` into WORK/distill: --distill-shards single-threaded shards run in parallel
    (on a small CPU much faster than one multi-threaded beam search), then merged."""
    exe, shards = tool("kd-distill-corpus"), p.args.distill_shards
    cmd = [exe, "--data", p.path("data-bin"), "--path", checkpoint(p, "teacher"), "--split", split,
           "--out", p.path("distill"), "--max-tokens", "4000", "--beam", p.args.distill_beam] + MAX_LEN
    cmd += DISTILL_ENGINES[p.args.distill_engine]
    if shards == 1:
        return p.run("distill-" + split, cmd + ["--overwrite"])
    p.run("distill-" + split,
          [cmd + ["--cpu-threads", "1", "--num-shards", shards, "--shard-id", i, "--overwrite"]
           for i in range(shards)],
          [exe, "merge", "--out", p.path("distill"), "--split", split, "--overwrite"])


def dump_cache(p, k=CACHE_TOPK):
    """Top-``k`` teacher cache of train and valid in WORK/cache{k} (steps cache{k}-{train,valid}):
    kd-dump-teacher sharded like the distillation (--distill-shards single-threaded processes), then merged.
    Returns the cache directory."""
    name = "cache%d" % k
    out, exe, shards = p.path(name), tool("kd-dump-teacher"), p.args.distill_shards
    for split in ("train", "valid"):
        cmd = [exe, "--data", p.path("data-bin"), "--path", checkpoint(p, "teacher"), "--split", split,
               "--topk", k, "--out", out, "--max-tokens", "4000", "--overwrite"]
        if shards == 1:  # one process (torch's threads), no shard files to merge
            p.run("%s-%s" % (name, split), cmd)
            continue
        merge = [exe, "merge", "--out", out, "--split", split, "--overwrite"]
        p.run("%s-%s" % (name, split), [cmd + ["--cpu-threads", "1", "--num-shards", shards, "--shard-id", i]
                                         for i in range(shards)], merge)
    return out


def recorded_train_cmd(p, name):
    """The fairseq-train command that step train-NAME ran (its done-marker's: made by this run or reused from
    an earlier one), paths relative to the repository as records store them; None for a marker without one."""
    done = p.cached("train-" + name) or {}
    stages = done.get("cmd")
    if not stages:
        return None
    (cmd,), = stages  # one stage of one command (Pipeline.run)
    return [repo_relative(str(x)) for x in cmd]


def count_params(ckpt):
    """Parameters of the checkpoint's model (tensors shared by --share-all-embeddings counted once; the
    encoder layers' BetterTransformer weight copies not counted)."""
    import torch

    from kd_plugin.model_size import count_parameters

    return count_parameters(torch.load(ckpt, map_location="cpu", weights_only=False)["model"].items())


# ---------------------------------------------------------------- evaluation


def generate_cmd(p, name):
    """STOCK fairseq-generate (no --user-dir): the students are plain fairseq transformers."""
    return [tool("fairseq-generate"), p.path("data-bin"), "--path", checkpoint(p, name),
            "--source-lang", p.args.src_lang, "--target-lang", p.args.tgt_lang, "--gen-subset", "test",
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
    """sacreBLEU BLEU and chrF of the system's test hypotheses against the raw test.{tgt}."""
    from sacrebleu.metrics import BLEU, CHRF

    refs = read_lines(p.path("corpus", "test.%s" % p.args.tgt_lang))
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


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    quick = bool(os.environ.get("QUICK")) or "--quick" in (argv if argv is not None else sys.argv[1:])
    column = 1 if quick else 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=quick,
                        help="smoke run (also QUICK=1): 3k-pair subset, tiny models, scores meaningless")
    parser.add_argument("--work", help="work directory (default: work/demo, work/demo-quick with --quick; with "
                                       "--data: work/demo[-quick]-NAME-SRC-TGT for NAME.tsv)")
    parser.add_argument("--data", default=os.environ.get("DATA") or None,
                        help="SRC<TAB>TGT corpus to use instead of the LibreOffice help (also DATA=file.tsv)")
    parser.add_argument("--src-lang", default="de", help="language code of the --data TSV's first column")
    parser.add_argument("--tgt-lang", default="en", help="language code of the --data TSV's second column")
    build_corpus.add_clean_args(parser)
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
    parser.add_argument("--distill-engine", choices=list(DISTILL_ENGINES), default="ctranslate2",
                        help="kd-distill-corpus --engine (ctranslate2: float32 conversion of the teacher)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of training/decoding (0: torch's default for the teacher and "
                             "decoding, cores / --jobs for each student; 1 on a busy machine)")
    parser.add_argument("--jobs", type=int, default=min(len(os.sched_getaffinity(0)), 4),
                        help="students trained (and scored) at the same time")
    parser.add_argument("--max-update", type=int, default=0, help="stop every training here too (0: epochs only)")
    for key, values in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=values[column], help=HELP.get(key))
    for role in ("teacher", "student"):
        for side in SIDES:
            for k in ("layers", "ffn"):
                parser.add_argument("--%s-%s-%s" % (role, side, k), type=int, default=None,
                                    help="default: --%s-%s" % (role, k))
    a = parser.parse_args(argv)
    for flag, lang in (("--src-lang", a.src_lang), ("--tgt-lang", a.tgt_lang)):
        if not LANG_RE.match(lang):
            parser.error("%s: %r is not a language code (letters, digits, _)" % (flag, lang))
    if a.src_lang == a.tgt_lang:
        parser.error("--src-lang and --tgt-lang are both %r" % a.src_lang)
    if not a.data and (a.src_lang, a.tgt_lang) != build_corpus.LANGS:
        parser.error("--src-lang/--tgt-lang: the default corpus is de-en; pass --data FILE.tsv for %s-%s"
                     % (a.src_lang, a.tgt_lang))
    a.clean_limits = build_corpus.clean_limits(parser, a)
    if a.work is None:
        name = "demo-quick" if quick else "demo"
        if a.data:
            stem = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(a.data))[0])
            name = "%s-%s-%s-%s" % (name, stem, a.src_lang, a.tgt_lang)
        a.work = os.path.join(REPO, "work", name)
    a.work, a.cache = os.path.abspath(a.work), os.path.abspath(a.cache)
    a.data = a.data and os.path.abspath(a.data)
    a.students = [s for s in a.students.split(",") if s]
    unknown = [s for s in a.students if s not in STUDENTS]
    if unknown:
        parser.error("--students: unknown %s (choose from %s)" % (unknown, ", ".join(STUDENTS)))
    if a.jobs < 1:
        parser.error("--jobs must be >= 1 (got %d)" % a.jobs)
    if a.speed_reps < 1:
        parser.error("--speed-reps must be >= 1 (got %d)" % a.speed_reps)
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.data:  # before anything is written
        try:
            check_user_corpus(a)
        except build_corpus.CorpusError as e:
            print("demo: error: %s" % e, file=sys.stderr)
            sys.exit(2)
    p = Pipeline(a)
    p.progress("demo", "work directory %s (%s mode, %s -> %s)" % (p.work, "QUICK" if a.quick else "full",
                                                                  a.src_lang, a.tgt_lang))
    try:
        build_teacher(p)
        results = {"teacher": evaluate(p, "teacher")}
        p.progress("teacher", "BLEU %.1f chrF %.1f" % (results["teacher"]["bleu"], results["teacher"]["chrf"]))
        export(p, "teacher", checkpoint(p, "teacher"))
        if needs(a.students, "{distill}"):
            for split in ("train", "valid"):
                distill(p, split)
        if needs(a.students, "{cache}"):
            dump_cache(p)
        results.update(train_students(p))
        columns = inference_columns(p, list(results), checkpoint, lambda name: generate_cmd(p, name))
    except (StepFailed, build_corpus.CorpusError) as e:
        sys.exit("demo: %s" % e)
    for name, r in results.items():
        r.update(columns[name])
    text = report(p, results, {s: student_args(p, s) for s in a.students}, generate_cmd(p, "SYSTEM"),
                  student_threads(a), {role: shape(a, role) for role in ("teacher", "student")})
    write_lines(p.path("results.md"), text.split("\n"))
    docs = not a.quick and not a.data  # only the default corpus's full run is the repository's DEMO.md
    if docs:
        os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
        write_lines(os.path.join(REPO, "docs", "DEMO.md"), text.split("\n"))
    print("\n" + text)
    p.progress("demo", "finished; results in %s%s" % (p.path("results.md"), " and docs/DEMO.md" if docs else ""))
    if docs and results["teacher"]["bleu"] < 20:
        print("warning: the teacher reached only %.1f BLEU (expected >= 20)" % results["teacher"]["bleu"])
    if any(r["params"] >= results["teacher"]["params"] for name, r in results.items() if name != "teacher"):
        print("warning: the students are not smaller than the teacher (see --student-* and --teacher-*)")


if __name__ == "__main__":
    main()
