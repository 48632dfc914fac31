r"""kd-advise: which KD to run for this teacher, student and data -- from signals measured in seconds and
the rule fitted on the study (docs/STUDY.md, "Which KD should I use?").

    kd-advise --data DATA_BIN --teacher T.pt --student-arch "--arch transformer --encoder-layers 1 ..."
              [--split train] [--sample 500] [--beam 5 | --sampling] [--json] [--rule FILE]

Measures (kd_plugin.advice): the capacity ratio (the student is BUILT from --student-arch on the data's
dictionaries, never trained), the source length and rare-subword rate of the whole split, and the teacher's
entropy, confidence and gold NLL under teacher forcing on --sample sentences of it (drawn with --seed). Prints
the recommended criterion with the flags to pass, the signals, and how far to trust it: the rule's
leave-one-cell-out accuracy on the study and the study cell nearest to these signals. The rule ships with the
package (kd_plugin/advise_rule.json, written by ``examples/study_advise.py --write``); --rule reads another.
Bad input: one line ``kd-advise: error: ...``, exit status 2.
"""
import argparse
import json
import logging
import os
import shlex
import sys
import time
import warnings

import numpy as np
import torch
from fairseq import options, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from kd_plugin import advice
from kd_plugin.checks import KDConfigError
from kd_plugin.cli import fairseq_io, flags
from kd_plugin.model_size import count_parameters
from kd_plugin.teacher import Teacher

PROG = "kd-advise"
RULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "advise_rule.json")
# what to run for each method, {cache} / {targets} being the outputs of the two preparation tools
FLAGS = {
    "plain": "--criterion label_smoothed_cross_entropy --label-smoothing 0.1",
    "token": "--user-dir kd_plugin --task translation_kd --teacher-cache {cache} --criterion token_kd "
             "--kd-topk 8 --kd-alpha 0.5 --label-smoothing 0.1",
    "sentence": "--user-dir kd_plugin --task translation_kd --teacher-targets {targets} --criterion sentence_kd "
                "--label-smoothing 0.1",
    "hybrid": "--user-dir kd_plugin --task translation_kd --teacher-cache {cache} --teacher-targets {targets} "
              "--criterion hybrid_kd --kd-topk 8 --kd-gate fixed:0.5 --label-smoothing 0.1",
}
PREPARE = {
    "plain": [],
    "token": ["kd-dump-teacher --data DATA --path T.pt --split {train,valid} --topk 8 --out {cache}"],
    "sentence": ["kd-distill-corpus --data DATA --path T.pt --split {train,valid} --out {targets}"],
    "hybrid": ["kd-dump-teacher --data DATA --path T.pt --split {train,valid} --topk 8 --out {cache}",
               "kd-distill-corpus --data DATA --path T.pt --split {train,valid} --out {targets}"],
}
NOTES = {
    "hybrid": "hybrid_kd runs the student on gold and teacher-decoded prefixes: about 2x token_kd's student "
              "compute per update; at equal compute, token_kd for twice the epochs beat it on the demo "
              "(docs/MIX.md, 'Equal compute')",
    "plain": "on this side of the rule every KD method scored below plain training in the study's cells",
}
CRITERION = {"plain": "label_smoothed_cross_entropy (no KD)", "token": "token_kd", "sentence": "sentence_kd",
             "hybrid": "hybrid_kd"}


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Recommend token_kd, sentence_kd or hybrid_kd for a "
                                     "teacher, a student architecture and a binarized corpus.")
    flags.add_data_args(parser)
    parser.add_argument("--teacher", required=True, metavar="T.pt[:T2.pt]", help="teacher checkpoint(s)")
    parser.add_argument("--student-arch", required=True, metavar='"FLAGS"',
                        help="the student's fairseq-train model flags, quoted: --arch and its options")
    parser.add_argument("--sample", type=flags.positive_int, default=500,
                        help="sentences of --split the teacher is run on (default 500)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the sentence sample")
    parser.add_argument("--beam", type=flags.positive_int, default=5, help="the beam you will decode with")
    parser.add_argument("--sampling", action="store_true", help="you will decode by sampling")
    parser.add_argument("--max-tokens", type=flags.positive_int, default=4000, help="tokens per teacher batch")
    parser.add_argument("--cpu", action="store_true", help="run the teacher on CPU even when CUDA is available")
    parser.add_argument("--rule", default=RULE, metavar="FILE", help="the fitted rule (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# ---------------------------------------------------------------- measuring


def student_parameters(arch, task, data):
    """Parameters of the student that ``arch`` (fairseq-train flags) builds for ``task`` (never trained)."""
    parser = options.get_training_parser(default_task="translation")

    def error(message):
        raise KDConfigError("--student-arch: %s" % message)

    parser.error = error
    try:
        flags = shlex.split(arch)
    except ValueError as e:
        raise KDConfigError("--student-arch: %s" % e) from None
    if "--arch" not in flags and "-a" not in flags:
        raise KDConfigError("--student-arch: no --arch in %r (e.g. \"--arch transformer --encoder-layers 1\")" % arch)
    argv = [data, "--task", "translation", "--source-lang", task.cfg.source_lang,
            "--target-lang", task.cfg.target_lang] + flags
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    try:
        model = task.build_model(cfg.model)
    except (ValueError, AssertionError, RuntimeError) as e:  # e.g. --share-all-embeddings without a joined dict
        raise KDConfigError("--student-arch: fairseq cannot build this model on %s: %s" % (data, e)) from None
    return count_parameters(model.named_parameters())


def sample_ids(n, size, seed):
    """``size`` distinct sentence ids of ``n`` (all if fewer), sorted, drawn with ``seed``."""
    return np.sort(np.random.RandomState(seed).choice(n, min(size, n), replace=False))


def teacher_signals(teacher, dataset, ids, max_tokens, pad):
    """Teacher entropy, confidence and gold NLL (kd_plugin.advice) on sentences ``ids`` of ``dataset``,
    in fairseq's own length-sorted batches of at most ``max_tokens``."""
    model = teacher.models[0]
    cuda = next(model.parameters()).device.type == "cuda"
    order = ids[np.argsort(dataset.num_tokens_vec(ids), kind="stable")]
    sums = []
    for batch in dataset.batch_by_size(order, max_tokens=max_tokens):
        sample = dataset.collater([dataset[int(i)] for i in batch])
        sample = utils.move_to_cuda(sample) if cuda else sample
        lprobs = teacher.signal(sample["net_input"], model)["lprobs"]
        sums.append(advice.teacher_sums(lprobs, sample["target"], pad))
    return advice.teacher_means(sums)


def measure(args):
    """{"signals": {...}, "info": {...}} of the scenario the flags describe."""
    cfg = fairseq_io.fairseq_config(args.data, args.source_lang, args.target_lang)
    task = fairseq_io.setup_task(cfg)
    dataset = fairseq_io.load_split(task, args.split)
    src_dict = task.source_dictionary
    threshold = advice.rare_threshold(len(src_dict), src_dict.nspecial)
    src_len, rare = advice.source_stats((dataset.src[i] for i in range(len(dataset))), src_dict.eos(), threshold)
    student = student_parameters(args.student_arch, task, args.data)
    members, paths = fairseq_io.load_ensemble(args.teacher, task, "--teacher",
                                          cuda=torch.cuda.is_available() and not args.cpu)
    teacher_params = sum(count_parameters(m.named_parameters()) for m in members)
    ids = sample_ids(len(dataset), args.sample, args.seed)
    signals = {"capacity_ratio": student / teacher_params,
               "decoding": advice.decoding_level(args.beam, args.sampling),
               "src_len": src_len, "rare_rate": rare}
    signals.update(teacher_signals(Teacher(members, paths), dataset, ids, args.max_tokens, task.target_dictionary.pad()))
    info = {"data": os.path.abspath(args.data), "split": args.split, "sentences": len(dataset),
            "sampled": len(ids), "seed": args.seed, "student_params": student, "teacher_params": teacher_params,
            "teacher": [os.path.abspath(p) for p in paths], "rare_from_index": threshold,
            "decoding": advice.DECODINGS[signals["decoding"]]}
    return {"signals": signals, "info": info}


# ---------------------------------------------------------------- advising


def read_rule(path):
    try:
        with open(path) as f:
            doc = json.load(f)
        doc["rule"], doc["cells"], doc["loo"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KDConfigError("--rule: %s is not a kd-advise rule file (%s: %s)" % (path, type(e).__name__, e)) from None
    return doc


def advise(doc, signals):
    """The recommendation for ``signals`` under the fitted rule ``doc``, with its confidence."""
    method = advice.apply_rule(doc["rule"], signals)
    near = advice.nearest_cell(doc["cells"], signals, doc.get("signals", advice.SIGNALS))
    ranked = sorted(near["bleu"], key=near["bleu"].get, reverse=True)
    loo = doc["loo"]
    return {"method": method, "criterion": CRITERION[method], "flags": FLAGS[method], "prepare": PREPARE[method],
            "rule": doc["rule"],
            "confidence": {"loo_accuracy": loo["accuracy"], "loo_bleu_lost": loo["bleu_lost_mean"],
                           "cells": loo["cells"], "nearest_cell": near["cell"], "nearest_best": ranked[0],
                           "nearest_margin": near["bleu"][ranked[0]] - near["bleu"][ranked[1]],
                           "nearest_agrees": ranked[0] == method,
                           "always_bleu_lost": {m: v["bleu_lost_mean"] for m, v in loo.get("always", {}).items()}},
            "note": NOTES.get(method, ""), "scope": doc.get("fitted", {}).get("scope", "")}


def describe_rule(rule):
    if rule.get("signal") is None:
        return "always %s (no one-signal split of the study's cells loses less BLEU)" % rule["method"]
    return "%s if %s <= %.4g, else %s" % (rule["below"], rule["signal"], rule["threshold"], rule["above"])


def always(confidence):
    """" (always token 1.00, ...)": the BLEU lost by each constant choice, for scale."""
    lost = confidence["always_bleu_lost"]
    return " (always %s)" % ", ".join("%s %.2f" % kv for kv in lost.items()) if lost else ""


def text_report(result):
    rec, s, i, c = result["advice"], result["signals"], result["info"], result["advice"]["confidence"]
    lines = ["recommendation: %s" % rec["criterion"],
             "  fairseq-train flags: %s" % rec["flags"]]
    lines += ["  prepare: %s" % p for p in rec["prepare"]]
    if rec["note"]:
        lines.append("  note: %s" % rec["note"])
    lines += ["rule: %s (fitted on %d study cells%s)" % (describe_rule(rec["rule"]), c["cells"],
                                                       ": " + rec["scope"] if rec["scope"] else ""),
              "confidence: leave-one-cell-out accuracy %.0f%%, mean BLEU lost %.2f%s; nearest study cell %s: best %s "
              "by %.2f BLEU (%s)" % (100 * c["loo_accuracy"], c["loo_bleu_lost"], always(c), c["nearest_cell"],
                                     c["nearest_best"], c["nearest_margin"],
                                     "agrees" if c["nearest_agrees"] else "DISAGREES"),
              "signals:",
              "  capacity_ratio      %.3f  (student %d / teacher %d parameters)"
              % (s["capacity_ratio"], i["student_params"], i["teacher_params"]),
              "  decoding            %d  (%s)" % (s["decoding"], i["decoding"]),
              "  src_len             %.2f  (mean source pieces, %d sentences of %s)" % (s["src_len"], i["sentences"],
                                                                                      i["split"]),
              "  rare_rate           %.4f  (source pieces with dictionary index >= %d)" % (s["rare_rate"],
                                                                                       i["rare_from_index"]),
              "  teacher_entropy     %.4f  (nats, %d sampled sentences)" % (s["teacher_entropy"], i["sampled"]),
              "  teacher_confidence  %.4f" % s["teacher_confidence"],
              "  teacher_nll         %.4f" % s["teacher_nll"]]
    return "\n".join(lines)


def main(args):
    doc = read_rule(args.rule)
    start = time.perf_counter()
    result = measure(args)
    result["info"]["seconds"] = time.perf_counter() - start
    result["advice"] = advise(doc, result["signals"])
    print(json.dumps(result, indent=1) if args.json else text_report(result))
    return result


def cli_main(argv=None):
    args = get_parser().parse_args(sys.argv[1:] if argv is None else argv)
    flags.run_cli(quiet_main, args, PROG)


def quiet_main(args):
    """:func:`main` without fairseq's INFO lines (LOGLEVEL=INFO brings them back) and without hydra's and
    torch's deprecation notices: the report is for reading. Both are restored afterwards."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(os.environ.get("LOGLEVEL", "WARNING").upper())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return main(args)
    finally:
        root.setLevel(level)


if __name__ == "__main__":
    cli_main()
