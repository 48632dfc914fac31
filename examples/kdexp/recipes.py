"""The shared training and evaluation commands of every driver (the demo's pipeline steps): the data steps and
the teacher, fairseq-train of a teacher or a student, kd-distill-corpus and kd-dump-teacher of the teacher,
stock fairseq-generate + sacreBLEU of a system, and what a record keeps of a run (its command, parameters,
updates, the teacher checkpoint's sha256). ``p`` is a kdexp.pipeline.Pipeline whose ``args`` are
kdexp.options.parse_args's.
"""
import json
import os
import re
import shutil

from kdexp.configs import CACHE_TOPK, STUDENTS, TEACHER
from kdexp.data import corpus_step_cmd, make_corpus, preprocess_cmd, train_bpe
from kdexp.pipeline import REPO, StepFailed, read_lines, repo_relative, sha256, tool, write_lines

# Output length cap of evaluation and distillation (1.2 * source + 10): keeps a weak model's degenerate
# repetitions from running to 200 tokens, which would dominate CPU decoding time.
MAX_LEN = ["--max-len-a", "1.2", "--max-len-b", "10"]
# kd-distill-corpus's engines: CTranslate2 (float32 conversion of the teacher) decodes the demo's training
# split several times faster than fairseq at the same students' BLEU (docs/DISTILL.md), so it is the default
DISTILL_ENGINES = {"ctranslate2": ["--engine", "ctranslate2", "--ct2-quantization", "float32"],
                   "fairseq": ["--engine", "fairseq"]}
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
    train(p, "teacher", "teacher", TEACHER.flags())


def cost_rank(name):
    """Start-order key: minus the teacher signals a student reads (the online teacher counts twice, the
    cache, the distilled targets and hybrid_kd's second decoder pass once each): costliest first."""
    args = " ".join(STUDENTS[name].flags())
    return -(2 * ("{teacher}" in args) + ("{cache}" in args) + ("{distill}" in args) + ("hybrid_kd" in args))


def student_threads(a):
    return a.threads or max(1, len(os.sched_getaffinity(0)) // a.jobs)


def checkpoint(p, name):
    return p.path("ckpt", name, "checkpoint_last.pt")


def student_args(p, name):
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": checkpoint(p, "teacher"),
             "distill": p.path("distill"), "cache": p.path("cache%d" % CACHE_TOPK)}
    return [str(arg).format(**paths) for arg in STUDENTS[name].flags()]


def needs(students, placeholder):
    return any(placeholder in arg for s in students for arg in STUDENTS[s].flags())


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


def teacher_sha256(p):
    """sha256 of the teacher checkpoint a run distils (records name their teacher)."""
    return sha256(checkpoint(p, "teacher"))
