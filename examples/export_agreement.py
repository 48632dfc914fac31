#!/usr/bin/env python3
"""How closely kd-export's CTranslate2 exports decode like fairseq, per quantization (docs/EXPORT.md's table).

    python examples/export_agreement.py --path CKPT --data DATA_BIN [-s de -t en] \
        [--quantizations none,float16,int8,...] [--check 500] [--refs corpus/test.en] [--json OUT]

For each quantization (``Q`` or ``Q@COMPUTE``: the export with weights Q, loaded by CTranslate2 with
``compute_type=COMPUTE``, e.g. ``int8@float32`` = int8 weights dequantized, float32 arithmetic) the model
is converted exactly as kd-export does (kd_plugin.cli.export.convert) and compared with fairseq on the first
``--check`` sentences of ``--split`` by kd-export's own functions (kd_plugin.cli.export_check):

* steps: kd-export's statistic (export_check.step_agreement): the share of fairseq's greedy decisions the
  export takes too given fairseq's own prefix, also per block of ``--block`` sentences (min-max over the
  blocks: how much a ``--block``-sentence check moves by chance);
* sentences: identical greedy outputs (kd-export's rule before the step statistic), also per block;
* ties: for every step where the export chose another token, fairseq's log-probability margin of its own
  token over the export's (median), and the share of all greedy steps whose top-2 margin is below that.

With ``--refs`` (raw references of ``--bleu-split``, e.g. the demo's WORK/corpus/test.en) the test set is also
decoded with beam ``--beam`` in fairseq-generate's batches and caps (examples/kdexp/speed.py: the demo's CT2
path) and scored with sacreBLEU, against stock ``fairseq-generate`` (the demo's command) on the same split.
``--speed-reps R`` times that decoding R interleaved rounds. Everything runs on the CPU, one thread unless
``--cpu-threads``; CTranslate2's int8 backend is its default unless ``CT2_USE_MKL=1`` is set (recorded in
the ``--json`` output).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from kdexp.speed import batches, detokenize, max_len

BIN = os.path.dirname(sys.executable)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("-s", "--source-lang", default=None)
    p.add_argument("-t", "--target-lang", default=None)
    p.add_argument("--quantizations", default="none,float16,bfloat16,int16,int8,int8@float32,int8_float16")
    p.add_argument("--check", type=int, default=500)
    p.add_argument("--split", default="valid")
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--refs", default=None, help="raw references of --bleu-split (enables the BLEU columns)")
    p.add_argument("--bleu-split", default="test")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--speed-reps", type=int, default=0,
                   help="with --refs: time the beam decoding of --bleu-split this many rounds, interleaved over the "
                        "quantizations (translate_batch only, one thread); the median sentences/s per row")
    p.add_argument("--json", default=None, help="write the results here too")
    return p.parse_args(argv)


def split_tokens(task, split):
    """(source tokens, target length) per sentence of a binarized split, in id order."""
    from kd_plugin.cli import export_check, fairseq_io

    dataset = fairseq_io.load_split(task, split)
    sources = export_check.check_sentences(task, dataset, len(dataset))
    return sources, [int(n) - 1 for n in dataset.tgt_sizes]


def fairseq_bleu(a, refs):
    """Stock fairseq-generate with the demo's test command: (BLEU, hypotheses)."""
    from sacrebleu.metrics import BLEU

    cmd = [os.path.join(BIN, "fairseq-generate"), a.data, "--path", a.path, "--gen-subset", a.bleu_split,
           "--beam", str(a.beam), "--batch-size", str(a.batch_size), "--remove-bpe", "sentencepiece",
           "--max-len-a", str(a.max_len_a), "--max-len-b", str(a.max_len_b), "--cpu", "--num-workers", "0"]
    cmd += ["-s", a.source_lang] if a.source_lang else []
    cmd += ["-t", a.target_lang] if a.target_lang else []
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    hyps = {}
    for line in log.splitlines():
        m = re.match(r"H-(\d+)\t[^\t]*\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    hyps = [hyps[i] for i in range(len(refs))]
    return BLEU().corpus_score(hyps, [refs]).score, hyps


def ct2_beam(translator, sources, tgt_sizes, a):
    """The demo's CT2 path (kdexp.speed.ct2_translate) on the binarized split: (detokenized hypotheses, seconds
    spent in translate_batch)."""
    hyps, seconds = [None] * len(sources), 0.0
    for ids in batches([len(s) for s in sources], tgt_sizes, a.batch_size):
        src = [sources[i] for i in ids]
        cap = max_len(max(len(s) for s in src), a.max_len_a, a.max_len_b)
        t0 = time.perf_counter()
        out = translator.translate_batch(src, beam_size=a.beam, max_decoding_length=cap, min_decoding_length=1)
        seconds += time.perf_counter() - t0
        for i, result in zip(ids, out):
            hyps[i] = detokenize(result.hypotheses[0])
    return hyps, seconds


def ct2_bleu(translator, sources, tgt_sizes, a, refs):
    """sacreBLEU of :func:`ct2_beam`'s hypotheses: (BLEU, hypotheses)."""
    from sacrebleu.metrics import BLEU

    hyps, _ = ct2_beam(translator, sources, tgt_sizes, a)
    return BLEU().corpus_score(hyps, [refs]).score, hyps


def greedy_margins(model, task, sentences, reference):
    """Per sentence, fairseq's log-probabilities along its own greedy output (teacher-forced, one forward):
    a list of (log_softmax row per step) tensors; steps as in export_check.step_agreement."""
    import torch

    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    out = []
    with torch.inference_mode():
        for tokens, ref in zip(sentences, reference):
            src = [src_dict.index(t) for t in tokens] + [src_dict.eos()]
            prev = [tgt_dict.eos()] + [tgt_dict.index(t) for t in ref]
            logits, _ = model(torch.tensor([src]), torch.tensor([len(src)]), torch.tensor([prev]))
            out.append(torch.log_softmax(logits[0].float(), dim=-1))
    return out


def tie_stats(lprobs, reference, flips, tgt_dict):
    """Median margin of fairseq's token over the export's at the disagreements, and the share of all
    greedy steps whose top-1 / top-2 margin is below that median."""
    import torch

    if not flips:
        return None, None
    idx = lambda tok: tgt_dict.eos() if tok is None else tgt_dict.index(tok)  # noqa: E731
    at_flips = [float(lprobs[i][j, idx(ref_tok)] - lprobs[i][j, idx(our_tok)]) for i, j, ref_tok, our_tok in flips]
    med = statistics.median(at_flips)
    gaps = []
    for lp in lprobs:
        top2 = torch.topk(lp, 2, dim=-1).values
        gaps += (top2[:, 0] - top2[:, 1]).tolist()
    return med, sum(g <= med for g in gaps) / len(gaps)


def speed(a, rows, converted, sources, tgt_sizes):
    """Median sentences/s of each row's beam decoding of the test split (ct2_beam), over ``--speed-reps``
    interleaved rounds (round r starts at row r); adds ``sentences_per_s`` to the rows."""
    import ctranslate2

    times = {id(r): [] for r in rows}
    for rep in range(a.speed_reps):
        for r in rows[rep % len(rows):] + rows[:rep % len(rows)]:
            q, _, compute = r["quantization"].partition("@")
            translator = ctranslate2.Translator(converted[q], device="cpu", inter_threads=1,
                                               intra_threads=a.cpu_threads, compute_type=compute or "default")
            times[id(r)].append(len(sources) / ct2_beam(translator, sources, tgt_sizes, a)[1])
    for r in rows:
        r["sentences_per_s"] = statistics.median(times[id(r)])
        print("%s: %.1f sentences/s (median of %s)" % (r["quantization"], r["sentences_per_s"],
                                                       ", ".join("%.1f" % x for x in times[id(r)])), flush=True)


def table(info, block):
    """The markdown table of docs/EXPORT.md for one model."""
    fmt = lambda value, spec: "-" if value is None else spec % value  # noqa: E731
    out = ["| `--quantization` | computed as | `model.bin` (B) | greedy steps agreeing | min-max per %d sentences | "
           "identical greedy sentences | min-max per %d | median margin at flips (nats) | test BLEU, beam %s (change) "
           "| identical beam outputs |" % (block, block, info.get("beam", 5)),
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in info["rows"]:
        out.append("| `%s` | %s | %d | %.2f%% | %s-%s%% | %d/%d | %s-%s%% | %s | %s | %s |" % (
            r["quantization"], r["compute_type"], r["model_bin_bytes"], r["step_percent"],
            fmt(r["step_block_min"], "%.1f"), fmt(r["step_block_max"], "%.1f"), r["sentences_identical"],
            info["sentences"], fmt(r["block_min"], "%.0f"), fmt(r["block_max"], "%.0f"),
            fmt(r["median_margin_at_flips"], "%.3f"),
            "%.2f (%+.2f)" % (r["bleu"], r["bleu_change"]) if "bleu" in r else "-",
            fmt(r.get("beam_identical_percent"), "%.1f%%")))
    return "\n".join(out)


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def main(argv=None):
    a = parse_args(argv)
    import ctranslate2
    import torch

    import kd_plugin  # noqa: F401  (kd_plugin.fairseq_patches: fairseq checkpoints load on torch >= 2.6)
    from kd_plugin.cli import export, export_check, fairseq_io
    from kd_plugin.teacher import read_checkpoint

    torch.set_num_threads(a.cpu_threads)
    state = read_checkpoint(a.path, "--path")
    src = a.source_lang or getattr(state["cfg"].task, "source_lang", None)
    tgt = a.target_lang or getattr(state["cfg"].task, "target_lang", None)
    task = fairseq_io.setup_task(fairseq_io.fairseq_config(a.data, src, tgt))
    model = export_check.build_fairseq_model(state, task, a.path)
    positions = model.max_decoder_positions()
    sentences = export_check.check_sentences(task, fairseq_io.load_split(task, a.split), a.check)
    t0 = time.perf_counter()
    reference = export_check.fairseq_greedy(model, task, sentences, a.max_len_a, a.max_len_b)
    fairseq_s = time.perf_counter() - t0
    lprobs = greedy_margins(model, task, sentences, reference)
    lengths = [len(r) for r in reference]
    capped = sum(len(r) == export_check.max_len(len(s) + 1, a.max_len_a, a.max_len_b, positions)
                 for s, r in zip(sentences, reference))
    info = {"checkpoint": os.path.abspath(a.path), "split": a.split, "sentences": len(sentences),
            "mean_output_tokens": sum(lengths) / len(lengths), "capped_outputs": capped,
            "fairseq_greedy_s": fairseq_s, "ctranslate2": ctranslate2.__version__, "beam": a.beam,
            "cpu_compute_types": sorted(ctranslate2.get_supported_compute_types("cpu")),
            "CT2_USE_MKL": os.environ.get("CT2_USE_MKL"), "cpu": cpu_name(), "rows": []}
    print("%s: %d %s sentences, fairseq greedy mean %.1f tokens (%d at the cap), %.1fs"
          % (a.path, len(sentences), a.split, info["mean_output_tokens"], capped, fairseq_s), flush=True)
    if a.refs:
        with open(a.refs, encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        test_src, test_tgt = split_tokens(task, a.bleu_split)
        info["fairseq_bleu"], fairseq_hyps = fairseq_bleu(argparse.Namespace(**dict(vars(a), source_lang=src,
                                                                                     target_lang=tgt)), refs)
        print("fairseq-generate beam %d on %s: BLEU %.2f" % (a.beam, a.bleu_split, info["fairseq_bleu"]), flush=True)
    tmp = tempfile.mkdtemp(prefix="export_agreement.")
    try:
        converted = {}
        for spec in a.quantizations.split(","):
            q, _, compute = spec.partition("@")
            if q not in converted:
                converted[q] = os.path.join(tmp, q)
                args = argparse.Namespace(data=a.data, path=a.path, quantization=q)
                export.convert(state, args, tmp, converted[q], src, tgt)
            translator = ctranslate2.Translator(converted[q], device="cpu", inter_threads=1,
                                               intra_threads=a.cpu_threads, compute_type=compute or "default")
            t0 = time.perf_counter()
            ours = export_check.ctranslate2_greedy(translator, sentences, a.max_len_a, a.max_len_b, positions)
            ct2_s = time.perf_counter() - t0
            same = [x == y for x, y in zip(ours, reference)]
            blocks = [100.0 * sum(same[k:k + a.block]) / len(same[k:k + a.block])
                      for k in range(0, len(same) - a.block + 1, a.block)]
            agree, steps, flips = export_check.step_agreement(translator, sentences, reference, a.max_len_a,
                                                              a.max_len_b, positions)
            margin, below = tie_stats(lprobs, reference, flips, task.target_dictionary)
            sentence_steps = [len(r) + (len(r) < export_check.max_len(len(x) + 1, a.max_len_a, a.max_len_b,
                                                                      positions))
                              for x, r in zip(sentences, reference)]
            sentence_flips = [0] * len(sentences)
            for i, *_ in flips:
                sentence_flips[i] += 1
            step_blocks = [100.0 * (1 - sum(sentence_flips[k:k + a.block]) / sum(sentence_steps[k:k + a.block]))
                           for k in range(0, len(sentences) - a.block + 1, a.block)]
            short = [s for s, r in zip(same, reference) if len(r) <= 10]
            row = {"quantization": spec, "compute_type": translator.compute_type,
                   "model_bin_bytes": os.path.getsize(os.path.join(converted[q], "model.bin")),
                   "sentences_identical": sum(same), "sentence_percent": 100.0 * sum(same) / len(same),
                   "block_min": min(blocks) if blocks else None, "block_max": max(blocks) if blocks else None,
                   "short_sentence_percent": 100.0 * sum(short) / len(short) if short else None,
                   "steps_agreeing": agree, "steps": steps, "step_percent": 100.0 * agree / steps,
                   "step_block_min": min(step_blocks) if step_blocks else None,
                   "step_block_max": max(step_blocks) if step_blocks else None,
                   "median_margin_at_flips": margin, "steps_with_smaller_margin": below, "ct2_greedy_s": ct2_s}
            if a.refs:
                row["bleu"], hyps = ct2_bleu(translator, test_src, test_tgt, a, refs)
                row["bleu_change"] = row["bleu"] - info["fairseq_bleu"]
                row["beam_identical_percent"] = 100.0 * sum(x == y for x, y in zip(hyps, fairseq_hyps)) / len(hyps)
            info["rows"].append(row)
            print(json.dumps(row), flush=True)
        if a.refs and a.speed_reps:
            speed(a, info["rows"], converted, test_src, test_tgt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(info, a.block))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
