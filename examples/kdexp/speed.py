"""The demo's inference phase: each system exported to CTranslate2 (int8), its sizes, and its test-set speed.

Speed is measured after all training, one process at a time, one thread each, for two paths per system:
stock ``fairseq-generate`` (the demo's test decoding command plus ``--cpu --num-workers 0``; its own timer of
the decoding loop, printed as "Translated N sentences (M tokens) in Xs (Y sentences/s, ...)") and the
CTranslate2 int8 export (this module run as ``python -m kdexp.speed ct2 ...`` in a subprocess: ``translate_batch``
with ``intra_threads=1`` timed over the test set). Both exclude model loading, decode the same batches
(fairseq-generate's: the test set ordered by source length, ties by target length, in batches of
``BATCH``) with the same beam and the same output cap per batch,

    max_len(batch) = floor(a * (longest source in the batch + EOS) + b)        (fairseq's rule)

and detokenize the same way (fairseq's ``--remove-bpe sentencepiece``). The measurements are interleaved
(round-robin over systems and paths, repeated ``--speed-reps`` times, each round in another order) and the
median is reported. The whole phase is one cached step ("speed", WORK/speed.json); it is redone when the
set of systems or the repetitions change.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

from kdexp.pipeline import EXAMPLES, StepFailed, read_lines, tool, write_lines

BEAM, BATCH = 5, 64  # the demo's test decoding (recipes.generate_cmd)
PATHS = ("fairseq", "ct2")
SPEED_RE = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")


# ---------------------------------------------------------------- pure pieces


def parse_generate_speed(text):
    """(sentences, seconds, sentences/s) from fairseq-generate's summary line in ``text``, or None."""
    m = SPEED_RE.search(text)
    if m is None:
        return None
    return int(m.group(1).replace(",", "")), float(m.group(3)), float(m.group(4))


def batches(src_sizes, tgt_sizes, batch_size, multiple=8):
    """fairseq-generate's test batches: ids ordered by source length, ties by target length, then by id
    (LanguagePairDataset.ordered_indices without shuffling), cut into chunks of ``batch_size``; a last chunk
    longer than ``multiple`` (--required-batch-size-multiple) and not a multiple of it is cut in two, as
    fairseq's batch_by_size does (44 -> 40 + 4)."""
    order = sorted(range(len(src_sizes)), key=lambda i: (src_sizes[i], tgt_sizes[i]))
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    cut = len(out[-1]) - len(out[-1]) % multiple if out else 0
    if 0 < cut < len(out[-1]):
        out[-1:] = [out[-1][:cut], out[-1][cut:]]
    return out


def max_len(longest_source, a, b):
    """fairseq's output cap for a batch whose longest source has ``longest_source`` tokens (EOS excluded)."""
    return int(a * (longest_source + 1) + b)


def detokenize(pieces):
    """fairseq's ``--remove-bpe sentencepiece`` (data_utils.post_process) of a list of pieces."""
    return " ".join(pieces).replace(" ", "").replace("\u2581", " ").strip()


def schedule(systems, reps):
    """[(rep, system, path)]: every system and path once per round, ``reps`` rounds; round r starts at
    system r (rotated) and swaps the two paths on odd rounds, so no system always runs first or last."""
    plan = []
    for r in range(reps):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        paths = PATHS if r % 2 == 0 else PATHS[::-1]
        plan += [(r, name, path) for name in order for path in paths]
    return plan


# ---------------------------------------------------------------- CTranslate2 timing (subprocess)


def ct2_translate(args):
    """Decode the test set with the export and time only translate_batch; print one JSON line."""
    import ctranslate2

    sources = [line.split() for line in read_lines(args.source)]
    tgt_sizes = [len(line.split()) for line in read_lines(args.target)]
    translator = ctranslate2.Translator(args.model, device="cpu", inter_threads=1, intra_threads=1)
    hyps, seconds = [None] * len(sources), 0.0
    for ids in batches([len(s) for s in sources], tgt_sizes, args.batch_size):
        src = [sources[i] for i in ids]
        cap = max_len(max(len(s) for s in src), args.max_len_a, args.max_len_b)
        start = time.perf_counter()
        out = translator.translate_batch(src, beam_size=args.beam, max_decoding_length=cap,
                                         min_decoding_length=1)
        seconds += time.perf_counter() - start
        for i, result in zip(ids, out):
            hyps[i] = detokenize(result.hypotheses[0])
    write_lines(args.out, hyps)
    print(json.dumps({"sentences": len(hyps), "seconds": seconds, "sentences_per_s": len(hyps) / seconds}))


# ---------------------------------------------------------------- the demo's steps


def export_dir(p, name):
    return p.path("export", name)


def export(p, name, checkpoint):
    """kd-export --quantization int8 of a system (cached step ``export-NAME``), checked by kd-export's own rule
    with its default threshold (docs/EXPORT.md): the float32 conversion identical to fairseq's greedy output on
    20 valid sentences, and the int8 export agreeing with at least --min-agreement's default share of fairseq's
    greedy steps; a failed check stops the demo. kd_export.json records both; the report shows the share of
    identical sentences."""
    a = p.args
    p.run("export-" + name, [tool("kd-export"), "--path", checkpoint, "--data", p.path("data-bin"),
                             "-s", a.src_lang, "-t", a.tgt_lang, "--out", export_dir(p, name),
                             "--quantization", "int8", "--max-len-a", "1.2", "--max-len-b", "10",
                             "--cpu-threads", "1", "--overwrite"])


def sizes(p, name, checkpoint):
    """Checkpoint size and the int8 export's size (all files of its directory) in MB, and its check."""
    folder = export_dir(p, name)
    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    with open(os.path.join(folder, "kd_export.json")) as f:
        check = json.load(f)["check"]
    return {"ckpt_mb": os.path.getsize(checkpoint) / 1e6,
            "ct2_mb": sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / 1e6,
            "ct2_agreement": check and check["agreement_percent"]}


def ct2_cmd(p, name, hyp):
    a = p.args
    return [sys.executable, "-m", "kdexp.speed", "ct2", "--model", export_dir(p, name),
            "--source", p.path("bpe", "test." + a.src_lang), "--target", p.path("bpe", "test." + a.tgt_lang),
            "--out", hyp, "--beam", BEAM, "--batch-size", BATCH, "--max-len-a", 1.2, "--max-len-b", 10]


def measure_one(p, rep, name, path, fairseq_cmd):
    """One timed decoding of the test set: sentences/s (the log is WORK/logs/speed-NAME-PATH-rREP.log)."""
    label = "speed-%s-%s-r%d" % (name, path, rep + 1)
    log = p.path("logs", label + ".log")
    if path == "fairseq":
        p.subprocesses(label, [fairseq_cmd + ["--cpu", "--num-workers", "0"]])
        with open(log, errors="replace") as f:
            found = parse_generate_speed(f.read())
        if found is None:
            raise StepFailed("%s: no 'Translated N sentences' line" % log)
        return found[2]
    env = dict(p.env, PYTHONPATH=os.pathsep.join([EXAMPLES] + [x for x in [p.env.get("PYTHONPATH")] if x]))
    p.subprocesses(label, [[str(c) for c in ct2_cmd(p, name, p.path("eval", "%s.ct2.hyp" % name))]], env)
    with open(log) as f:
        return json.loads(f.read().strip().splitlines()[-1])["sentences_per_s"]


def speed_phase(p, systems, reps, fairseq_cmd, step="speed"):
    """The cached step ``step``: every (system, path) timed ``reps`` times in schedule() order, one process
    at a time with one thread; WORK/STEP.json = {system: {path: [sentences/s per repetition]}}.
    ``fairseq_cmd(name)``: the system's fairseq-generate command."""
    plan = {"systems": list(systems), "reps": reps, "beam": BEAM, "batch": BATCH}
    done = p.cached(step)
    if done is not None and done.get("cmd") != plan:
        p.progress(step, "made for other systems or repetitions: measuring again")
        os.remove(p.path("done", step + ".json"))
    view = p.with_threads(1)

    def run():
        found = {name: {path: [] for path in PATHS} for name in systems}
        for rep, name, path in schedule(list(systems), reps):
            found[name][path].append(measure_one(view, rep, name, path, [str(c) for c in fairseq_cmd(name)]))
        write_lines(p.path(step + ".json"), [json.dumps(found)])

    p.step(step, run, plan)
    with open(p.path(step + ".json")) as f:
        return json.load(f)


def ct2_scores(p, name, refs):
    """BLEU and chrF (sacreBLEU) of the CT2 path's test hypotheses (the last repetition's, all identical)."""
    from sacrebleu.metrics import BLEU, CHRF

    hyps = read_lines(p.path("eval", "%s.ct2.hyp" % name))
    return {"ct2_bleu": BLEU().corpus_score(hyps, [refs]).score, "ct2_chrf": CHRF().corpus_score(hyps, [refs]).score}


def inference_columns(p, systems, checkpoint, fairseq_cmd):
    """{system: sizes, median sentences/s of both paths, CT2 BLEU/chrF}; runs the speed phase (cached)."""
    speed = speed_phase(p, systems, p.args.speed_reps, fairseq_cmd)
    refs = read_lines(p.path("corpus", "test.%s" % p.args.tgt_lang))
    out = {}
    for name in systems:
        out[name] = dict(sizes(p, name, checkpoint(p, name)), **ct2_scores(p, name, refs),
                         fairseq_speed=statistics.median(speed[name]["fairseq"]),
                         ct2_speed=statistics.median(speed[name]["ct2"]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time a CTranslate2 export on a test set (the speed phase's)")
    parser.add_argument("mode", choices=["ct2"])
    parser.add_argument("--model", required=True, help="CTranslate2 model directory")
    parser.add_argument("--source", required=True, help="test sources, sentencepiece pieces per line")
    parser.add_argument("--target", required=True, help="test references as pieces (their lengths order ties)")
    parser.add_argument("--out", required=True, help="detokenized hypotheses, in test-set order")
    parser.add_argument("--beam", type=int, default=BEAM)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--max-len-a", type=float, default=1.2)
    parser.add_argument("--max-len-b", type=int, default=10)
    ct2_translate(parser.parse_args(argv))


if __name__ == "__main__":
    main()
