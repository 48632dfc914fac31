#!/usr/bin/env python3
"""Sequence-level KD corpora by engine: distillation throughput, agreement, and the students they train.

    .venv/bin/python examples/distill_engines.py                 # everything (resumable), then the report
    .venv/bin/python examples/distill_engines.py --report        # docs/DISTILL.md's block from the records

It runs in examples/demo.py's work directory with the demo's cached steps (corpus, BPE, data-bin and the
teacher are built if missing, reused otherwise), then:

1. Throughput: the first eighth of the training split (``--num-shards 8 --shard-id 0``) decoded by the
   teacher at beam 5 with each ENGINES entry, at 1 and 2 threads, one process at a time: sentences/s of the
   decoding loop as kd-distill-corpus logs it (model loading and the one-off CTranslate2 conversion excluded;
   the conversion's seconds are reported beside it).
2. Corpora: train and valid distilled at beam 5 (CORPORA: fairseq, CTranslate2 float32, CTranslate2 float32 +
   Seq-Inter over the 5-best by sentence BLEU), each as ``--distill-shards`` single-thread shards in parallel,
   merged; wall seconds recorded; identical training lines against the fairseq corpus.
3. Students: sentence_kd on each corpus (every criterion flag spelled out), ``--seeds`` seeds, ``--epochs``
   epochs, the demo's student (kdexp/mix.py's train_and_score: stock fairseq-generate, beam 5).

Records: docs/distill_results.json ({"throughput": [...], "corpora": [...], "students": [compare_mix records]},
each with its command). The report (paired bootstrap of each corpus's students against the fairseq corpus's)
is written between the generated markers of docs/DISTILL.md (kdexp/distill.py).
"""
import argparse
import concurrent.futures
import json
import os
import re
import sys

from kdexp import corpus, recipes
from kdexp.distill import BEAM, CONFIGS, COMMON, CORPORA, ENGINES, report, write_block
from kdexp.mix import train_and_score
from kdexp.options import parse_args as demo_args
from kdexp.pipeline import REPO, Pipeline, StepFailed, read_lines, repo_relative, tool
from kdexp.report import machine

RATE_RE = re.compile(r"(\d+) sentences in ([\d.]+) s \(([\d.]+) sents/s\)")
CONVERT_RE = re.compile(r"CTranslate2 model: .* \(converted")
RESULTS = os.path.join(REPO, "docs", "distill_results.json")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def distill_cmd(p, split, out, flags):
    return [tool("kd-distill-corpus"), "--data", p.path("data-bin"), "--path", recipes.checkpoint(p, "teacher"),
            "--split", split, "--out", out] + COMMON + flags


def log_rate(p, step):
    """(sentences, seconds) of the decoding loop, from the step's log."""
    with open(p.path("logs", step + ".log"), errors="replace") as f:
        m = RATE_RE.findall(f.read())
    if not m:
        raise StepFailed("no decoding rate in %s" % p.path("logs", step + ".log"))
    return int(m[-1][0]), float(m[-1][1])


def throughput(p):
    """One record per (engine, threads): the first eighth of train, one process at a time."""
    records = []
    for engine, flags in ENGINES.items():
        for threads in (1, 2):
            step = "speed-%s-t%d" % (slug(engine), threads)
            cmd = distill_cmd(p, "train", p.path("speed", step), flags) + [
                "--num-shards", "8", "--shard-id", "0", "--cpu-threads", str(threads), "--overwrite"]
            p.with_threads(threads).run(step, cmd)
            n, seconds = log_rate(p, step)
            records.append({"engine": engine, "threads": threads, "beam": BEAM, "sentences": n,
                            "seconds": round(seconds, 2), "sentences_per_s": round(n / seconds, 1),
                            "cmd": [repo_relative(c) for c in cmd]})
    return records


def build_corpora(p):
    """Train and valid of every corpus: shards in parallel (1 thread each), merged. One record per corpus."""
    shards, records = p.args.distill_shards, []
    fairseq_lines = None
    for name, flags in CORPORA.items():
        out = p.path("distill-b5-%s" % name)
        seconds = 0.0
        for split in ("train", "valid"):
            cmd = distill_cmd(p, split, out, flags)
            merge = [tool("kd-distill-corpus"), "merge", "--out", out, "--split", split, "--overwrite"]
            p.with_threads(1).run("distill-b5-%s-%s" % (name, split),
                                  [cmd + ["--cpu-threads", "1", "--num-shards", shards, "--shard-id", i,
                                          "--overwrite"] for i in range(shards)], merge)
            seconds += p.seconds["distill-b5-%s-%s" % (name, split)]
        lines = read_lines(os.path.join(out, "train.%s-%s.%s.txt" % (p.args.src_lang, p.args.tgt_lang,
                                                                      p.args.tgt_lang)))
        fairseq_lines = fairseq_lines or lines
        records.append({"corpus": name, "flags": flags + COMMON, "shards": shards, "wall_seconds": round(seconds, 1),
                        "train_sentences": len(lines),
                        "identical_to_fairseq": sum(a == b for a, b in zip(lines, fairseq_lines)),
                        "cmd": [repo_relative(c) for c in distill_cmd(p, "train", out, flags)]})
    return records


def students(p, seeds):
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": recipes.checkpoint(p, "teacher"),
             **{"distill_%s" % name: p.path("distill-b5-%s" % name) for name in CORPORA}}
    view = p.with_threads(recipes.student_threads(p.args))
    runs = [("sentence-b5-" + name, s) for s in seeds for name in CORPORA]
    with concurrent.futures.ThreadPoolExecutor(max_workers=p.args.jobs) as pool:
        futures = [pool.submit(train_and_score, view, c, s, paths, CONFIGS[c].flags()) for c, s in runs]
        return [f.result() for f in futures]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs")
    parser.add_argument("--report", action="store_true", help="only write the report from --results")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "DISTILL.md"))
    args, rest = parser.parse_known_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args, demo_args(rest + ["--students", "plain"])


def main(argv=None):
    args, a = parse_args(argv)
    p = Pipeline(a)
    if not args.report:
        try:
            recipes.build_teacher(p)
            command = " ".join(["examples/distill_engines.py"] + (argv or sys.argv[1:]))
            results = {"machine": machine(), "command": command,
                       "throughput": throughput(p), "corpora": build_corpora(p)}
            p.args.student_epochs = args.epochs
            p.args.epochs = args.epochs
            results["students"] = students(p, args.seeds)
        except (StepFailed, corpus.CorpusError) as e:
            sys.exit("distill_engines: %s" % e)
        with open(args.results + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.results + ".tmp", args.results)
    with open(args.results) as f:
        results = json.load(f)
    refs_path = p.path("corpus", "test.%s" % a.tgt_lang)
    refs = read_lines(refs_path) if os.path.isfile(refs_path) else None
    block = report(results, args.seeds, args.epochs, refs)
    print(block)
    if refs is not None:
        write_block(args.doc, block)


if __name__ == "__main__":
    main()
