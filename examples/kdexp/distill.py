"""Sequence-level KD corpora by engine (examples/distill_engines.py): the engines and corpora compared, the
sentence_kd configuration trained on each corpus, and the report written between the generated markers of
docs/DISTILL.md (throughput, agreement with the fairseq corpus, the students' paired bootstrap)."""
import os

from kdexp import mix
from kdexp.configs import KD_TASK, sentence_kd
from kdexp.recipes import MAX_LEN

BEAM = 5
COMMON = ["--beam", str(BEAM), "--lenpen", "1", "--max-tokens", "4000"] + MAX_LEN
CT2 = ["--engine", "ctranslate2", "--inter-threads", "1"]
ENGINES = {"fairseq": ["--engine", "fairseq"],
           "ctranslate2 float32": CT2 + ["--ct2-quantization", "float32"],
           "ctranslate2 int8": CT2 + ["--ct2-quantization", "int8"]}
CORPORA = {"fairseq": ENGINES["fairseq"] + ["--nbest", "1", "--select", "top"],
           "ct2": ENGINES["ctranslate2 float32"] + ["--nbest", "1", "--select", "top"],
           "ct2-seqinter": ENGINES["ctranslate2 float32"] + ["--nbest", str(BEAM), "--select", "bleu",
                                                             "--remove-bpe", "sentencepiece"]}
BASELINE = "sentence-b5-fairseq"
# sentence_kd students on each corpus (placeholder {distill_CORPUS}: its directory)
CONFIGS = {"sentence-b5-" + name: sentence_kd(KD_TASK + ["--teacher-targets", "{distill_%s}" % name])
           for name in CORPORA}
BEGIN, END = "<!-- distill_engines.py: BEGIN (generated, do not edit) -->", "<!-- distill_engines.py: END -->"


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
            mix.report(results["students"], configs, seeds, epochs, BASELINE, refs, CONFIGS)]
    rows = {c: [r for r in results["students"] if r["config"] == c and r["epochs"] == epochs and r["seed"] in seeds]
            for c in ("sentence-b5-ct2-seqinter", "sentence-b5-ct2")}
    hyps = {c: mix.load_hyps(rs, refs) for c, rs in rows.items()}
    if all(h is not None for h in hyps.values()):
        d, lo, hi, p = mix.paired_bootstrap(hyps["sentence-b5-ct2-seqinter"], hyps["sentence-b5-ct2"], refs)
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
