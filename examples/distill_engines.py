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
   epochs, the demo's student (examples/compare_mix.py's train_and_score: stock fairseq-generate, beam 5).

Records: docs/distill_results.json ({"throughput": [...], "corpora": [...], "students": [compare_mix records]},
each with its command). The report (paired bootstrap of each corpus's students against the fairseq corpus's)
is written between the generated markers of docs/DISTILL.md.
"""
import argparse
import concurrent.futures
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_mix  # noqa: E402
import demo  # noqa: E402
from demo_pipeline import REPO, StepFailed, read_lines, tool  # noqa: E402
from demo_report import machine, repo_relative  # noqa: E402

BEAM = 5
COMMON = ["--beam", str(BEAM), "--lenpen", "1", "--max-tokens", "4000"] + demo.MAX_LEN
CT2 = ["--engine", "ctranslate2", "--inter-threads", "1"]
ENGINES = {"fairseq": ["--engine", "fairseq"],
           "ctranslate2 float32": CT2 + ["--ct2-quantization", "float32"],
           "ctranslate2 int8": CT2 + ["--ct2-quantization", "int8"]}
CORPORA = {"fairseq": ENGINES["fairseq"] + ["--nbest", "1", "--select", "top"],
           "ct2": ENGINES["ctranslate2 float32"] + ["--nbest", "1", "--select", "top"],
           "ct2-seqinter": ENGINES["ctranslate2 float32"] + ["--nbest", str(BEAM), "--select", "bleu",
                                                             "--remove-bpe", "sentencepiece"]}
BASELINE = "sentence-b5-fairseq"
for _name in CORPORA:
    compare_mix.CONFIGS["sentence-b5-" + _name] = (compare_mix.KD + ["--teacher-targets", "{distill_%s}" % _name]
                                                   + compare_mix.SENTENCE + compare_mix.LS)
RATE_RE = re.compile(r"(\d+) sentences in ([\d.]+) s \(([\d.]+) sents/s\)")
CONVERT_RE = re.compile(r"CTranslate2 model: .* \(converted")
BEGIN, END = "<!-- distill_engines.py: BEGIN (generated, do not edit) -->", "<!-- distill_engines.py: END -->"
RESULTS = os.path.join(REPO, "docs", "distill_results.json")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def distill_cmd(p, split, out, flags):
    return [tool("kd-distill-corpus"), "--data", p.path("data-bin"), "--path", demo.checkpoint(p, "teacher"),
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
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": demo.checkpoint(p, "teacher"),
             **{"distill_%s" % name: p.path("distill-b5-%s" % name) for name in CORPORA}}
    view = p.with_threads(demo.student_threads(p.args))
    runs = [("sentence-b5-" + name, s) for s in seeds for name in CORPORA]
    with concurrent.futures.ThreadPoolExecutor(max_workers=p.args.jobs) as pool:
        futures = [pool.submit(compare_mix.train_and_score, view, c, s, paths) for c, s in runs]
        return [f.result() for f in futures]


def report(results, seeds, epochs, refs):
    """Markdown: throughput, corpora, students (compare_mix's table, bootstrap against the fairseq corpus)."""
    speed = {(r["engine"], r["threads"]): r for r in results["throughput"]}
    base = {t: speed[("fairseq", t)]["sentences_per_s"] for t in (1, 2) if ("fairseq", t) in speed}
    out = ["Command: `.venv/bin/python %s`; machine: %s." % (results["command"], results["machine"]), "",
           "Distillation throughput (the first eighth of the training split, %d sentences, beam %d, one process; "
           "decoding loop only):" % (results["throughput"][0]["sentences"], BEAM), "",
           "| engine | threads | sentences/s | vs fairseq |", "|---|---:|---:|---:|"]
    for (engine, t), r in speed.items():
        out.append("| %s | %d | %.1f | %.2fx |" % (engine, t, r["sentences_per_s"], r["sentences_per_s"] / base[t]))
    out += ["", "Corpora (train + valid, %d single-thread shards in parallel, beam %d):" % (
        results["corpora"][0]["shards"], BEAM), "",
        "| corpus | wall s | train lines identical to fairseq's |", "|---|---:|---:|"]
    for r in results["corpora"]:
        out.append("| %s | %.0f | %d / %d (%.1f%%) |" % (r["corpus"], r["wall_seconds"], r["identical_to_fairseq"],
                                                        r["train_sentences"], 100.0 * r["identical_to_fairseq"]
                                                        / r["train_sentences"]))
    configs = ["sentence-b5-" + name for name in CORPORA]
    out += ["", "sentence_kd students (%d epochs, seeds %s) on each corpus, test set, stock fairseq-generate "
                "beam 5:" % (epochs, ",".join(map(str, seeds))), "",
            compare_mix.report(results["students"], configs, seeds, epochs, BASELINE, refs)]
    rows = {c: [r for r in results["students"] if r["config"] == c and r["epochs"] == epochs and r["seed"] in seeds]
            for c in ("sentence-b5-ct2-seqinter", "sentence-b5-ct2")}
    hyps = {c: compare_mix.load_hyps(rs, refs) for c, rs in rows.items()}
    if all(h is not None for h in hyps.values()):
        d, lo, hi, p = compare_mix.paired_bootstrap(hyps["sentence-b5-ct2-seqinter"], hyps["sentence-b5-ct2"], refs)
        out += ["", "Seq-Inter against the same engine's 1-best (sentence-b5-ct2), same bootstrap: %+.2f [%+.2f, "
                    "%+.2f], p = %.3f." % (d, lo, hi, p)]
    return "\n".join(out)


def write_block(path, block):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n" + block + "\n" + END + tail)
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs")
    parser.add_argument("--report", action="store_true", help="only write the report from --results")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "DISTILL.md"))
    args, rest = parser.parse_known_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args, demo.parse_args(rest + ["--students", "plain"])


def main(argv=None):
    args, a = parse_args(argv)
    p = demo.Pipeline(a)
    if not args.report:
        try:
            demo.build_teacher(p)
            results = {"machine": machine(), "command": " ".join(["examples/distill_engines.py"] + (argv or sys.argv[1:])),
                       "throughput": throughput(p), "corpora": build_corpora(p)}
            p.args.student_epochs = args.epochs
            p.args.epochs = args.epochs
            results["students"] = students(p, args.seeds)
        except (StepFailed, demo.build_corpus.CorpusError) as e:
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
