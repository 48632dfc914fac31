r"""kd-advise: which KD to run for this teacher, student and data -- the plateau study's answer (docs/PLATEAU.md),
with signals measured in seconds that say how far your scenario is from the one it was measured on.

    kd-advise --data DATA_BIN --teacher T.pt --student-arch "--arch transformer --encoder-layers 1 ..."
              [--split train] [--sample 500] [--beam 5 | --sampling] [--json] [--answer FILE] [--rule FILE]

Recommends what the plateau study found (kd_plugin/plateau_answer.json, written with docs/PLATEAU.md by
``examples/plateau.py --report``): the criterion that gave the best final student under your decoding (beam, greedy
or sampling), with its evidence and cost, and the one to use on a tight budget. Measures (kd_plugin.advice): the
capacity ratio (the student is BUILT from --student-arch on the data's dictionaries, never trained), the source
length and rare-subword rate of the whole split, and the teacher's entropy, confidence and gold NLL under teacher
forcing on --sample sentences of it (drawn with --seed), each printed beside the plateau scenario's value. Scope:
the 3-epoch study's rule (kd_plugin/advise_rule.json, ``examples/study_advise.py --write``; docs/STUDY.md), fitted
on students far from their plateau, is no recommendation; it only says whether your scenario lies on the same side
of the one split it found as the plateau's, and warns when it does not. --answer and --rule read other files.
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
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = os.path.join(PACKAGE, "advise_rule.json")
ANSWER = os.path.join(PACKAGE, "plateau_answer.json")
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
OTHER_SIDE = {"plain": "every KD method scored below plain training there",
              "hybrid": "hybrid_kd scored best there"}
DECODING_KEYS = ("beam5", "greedy", "sampling")  # the plateau answer's decodings, by advice.decoding_level
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
    parser.add_argument("--answer", default=ANSWER, metavar="FILE",
                        help="the plateau study's answer (default: the shipped one)")
    parser.add_argument("--rule", default=RULE, metavar="FILE",
                        help="the 3-epoch study's rule, for the scope check (default: the shipped one)")
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
    signals.update(teacher_signals(Teacher(members, paths), dataset, ids, args.max_tokens,
                                   task.target_dictionary.pad()))
    info = {"data": os.path.abspath(args.data), "split": args.split, "sentences": len(dataset),
            "sampled": len(ids), "seed": args.seed, "student_params": student, "teacher_params": teacher_params,
            "teacher": [os.path.abspath(p) for p in paths], "rare_from_index": threshold,
            "decoding": advice.DECODINGS[signals["decoding"]]}
    return {"signals": signals, "info": info}


# ---------------------------------------------------------------- advising


def read_json(path, flag, keys):
    try:
        with open(path) as f:
            doc = json.load(f)
        for k in keys:
            doc[k]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KDConfigError("%s: %s is not a kd-advise %s file (%s: %s)" % (
            flag, path, flag[2:], type(e).__name__, e)) from None
    return doc


def read_rule(path):
    return read_json(path, "--rule", ("rule", "cells", "loo"))


def read_answer(path):
    return read_json(path, "--answer", ("final", "budget", "seeds", "complete"))


def method_advice(method):
    return {"method": method, "criterion": CRITERION[method], "flags": FLAGS[method], "prepare": PREPARE[method]}


def study_rule(doc, signals):
    """The 3-epoch study's rule applied to ``signals``, with its leave-one-cell-out record and nearest cell."""
    method = advice.apply_rule(doc["rule"], signals)
    near = advice.nearest_cell(doc["cells"], signals, doc.get("signals", advice.SIGNALS))
    ranked = sorted(near["bleu"], key=near["bleu"].get, reverse=True)
    loo = doc["loo"]
    return {"method": method, "rule": doc["rule"],
            "confidence": {"loo_accuracy": loo["accuracy"], "loo_bleu_lost": loo["bleu_lost_mean"],
                           "cells": loo["cells"], "nearest_cell": near["cell"], "nearest_best": ranked[0],
                           "nearest_margin": near["bleu"][ranked[0]] - near["bleu"][ranked[1]],
                           "always_bleu_lost": {m: v["bleu_lost_mean"] for m, v in loo.get("always", {}).items()}},
            "fitted_scope": doc.get("fitted", {}).get("scope", "")}


def advise(answer, doc, signals):
    """The plateau study's answer (the best final student, the tight-budget picks) and the scope check: does
    the 3-epoch study's rule put ``signals`` on the side of its split where it puts the plateau scenario?"""
    decoding = DECODING_KEYS[int(signals["decoding"])]
    pick = answer.get("by_decoding", {}).get(decoding)
    if decoding == "beam5" or not pick:  # the final student's evidence: the paired bootstrap of beam 5
        evidence = answer["final"]
    else:
        evidence = dict({"test_bleu": pick["value"], "runner_up": pick["runner_up"],
                         "vs_runner_up": pick.get("vs_runner_up"),
                         "runner_up_bleu": pick["runner_up_value"]}, **answer["cost"][pick["method"]])
    method = pick["method"] if pick else answer["final"]["method"]
    out = dict(method_advice(method), decoding=decoding, evidence=evidence, complete=answer["complete"],
               seeds=answer["seeds"], budget=[dict(b, **method_advice(b["method"])) for b in answer["budget"]],
               equal_compute=answer.get("equal_compute"))
    rule = study_rule(doc, signals)
    measured = answer.get("scenario")
    scope = {"measured": measured, "study_rule": rule, "same_side": None}
    if measured:
        scope["same_side"] = advice.apply_rule(doc["rule"], measured["signals"]) == rule["method"]
    out["scope"] = scope
    return out


def describe_rule(rule):
    if rule.get("signal") is None:
        return "always %s (no one-signal split of the study's cells loses less BLEU)" % rule["method"]
    return "%s if %s <= %.4g, else %s" % (rule["below"], rule["signal"], rule["threshold"], rule["above"])


def always(confidence):
    """" (always token 1.00, ...)": the BLEU lost by each constant choice, for scale."""
    lost = confidence["always_bleu_lost"]
    return " (always %s)" % ", ".join("%s %.2f" % kv for kv in lost.items()) if lost else ""


def mean_text(m):
    return "%.2f" % m["mean"] if m["std"] is None else "%.2f ± %.2f" % (m["mean"], m["std"])


def diff_ci(d):
    """A paired bootstrap as '+diff [+lo, +hi]'."""
    return "%+.2f [%+.2f, %+.2f]" % (d["diff"], d["lo"], d["hi"])


def seed_list(d):
    return ", ".join(map(str, d["seeds"]))


def evidence_lines(rec):
    e, seeds = rec["evidence"], ", ".join("%s %d" % kv for kv in sorted(rec["seeds"].items()))
    d = e["vs_runner_up"]
    lines = ["  evidence: test BLEU %s against %s %s (%s)%s" % (
        mean_text(e["test_bleu"]), CRITERION[e["runner_up"]], mean_text(e["runner_up_bleu"]),
        "beam 5" if rec["decoding"] == "beam5" else rec["decoding"],
        "; paired bootstrap over the seeds both have (%s): %s, p = %.3f" % (seed_list(d), diff_ci(d), d["p"])
        if d else ""),
             "  cost: %.2fx plain training's student compute (token-rows) and %.2fx its wall time to the best "
             "epoch" % (e["compute_vs_plain"], e["wall_vs_plain"]),
             "  %s (seeds: %s)" % ("final" if rec["complete"] else "PROVISIONAL: the study is not finished", seeds)]
    if e.get("vs_plain"):  # beam 5's evidence: the best final student against plain training
        lines.insert(1, "  against plain training (no KD, %s): %s BLEU (paired bootstrap, seeds %s)" % (
            mean_text(e["plain_bleu"]), diff_ci(e["vs_plain"]), seed_list(e["vs_plain"])))
    q = rec.get("equal_compute")
    if q and q.get("vs_token"):
        lines.append("  at equal compute (half the epochs, annealed): %s BLEU against token_kd (paired bootstrap, "
                     "seeds %s)" % (diff_ci(q["vs_token"]), seed_list(q["vs_token"])))
    return lines


def scope_lines(rec, s, i):
    scope, rule = rec["scope"], rec["scope"]["study_rule"]
    c, measured = rule["confidence"], (scope["measured"] or {}).get("signals", {})

    def beside(name):
        return "  (plateau scenario %.4g)" % measured[name] if name in measured else ""

    lines = ["scope: measured on one scenario (docs/PLATEAU.md); the 3-epoch study's rule (%s; %d cells, "
             "leave-one-cell-out accuracy %.0f%%, mean BLEU lost %.2f%s; docs/STUDY.md) puts yours %s" % (
                 describe_rule(rule["rule"]), c["cells"], 100 * c["loo_accuracy"], c["loo_bleu_lost"], always(c),
                 "on the plateau scenario's side of its split" if scope["same_side"] else
                 "OUTSIDE it: on the other side of its split (%s picks %s%s); the plateau study has not measured "
                 "such a scenario" % (rule["rule"].get("signal"), rule["method"],
                                      ": " + OTHER_SIDE[rule["method"]] if rule["method"] in OTHER_SIDE else "")
                 if scope["same_side"] is False else "(the plateau scenario was not measured: no comparison)"),
             "signals:",
             "  capacity_ratio      %.3f  (student %d / teacher %d parameters)%s"
             % (s["capacity_ratio"], i["student_params"], i["teacher_params"], beside("capacity_ratio")),
             "  decoding            %d  (%s)%s" % (s["decoding"], i["decoding"], beside("decoding")),
             "  src_len             %.2f  (mean source pieces, %d sentences of %s)%s" % (
                 s["src_len"], i["sentences"], i["split"], beside("src_len")),
             "  rare_rate           %.4f  (source pieces with dictionary index >= %d)%s" % (
                 s["rare_rate"], i["rare_from_index"], beside("rare_rate")),
             "  teacher_entropy     %.4f  (nats, %d sampled sentences)%s" % (s["teacher_entropy"], i["sampled"],
                                                                           beside("teacher_entropy")),
             "  teacher_confidence  %.4f%s" % (s["teacher_confidence"], beside("teacher_confidence")),
             "  teacher_nll         %.4f%s" % (s["teacher_nll"], beside("teacher_nll"))]
    return lines


def text_report(result):
    rec, s, i = result["advice"], result["signals"], result["info"]
    lines = ["recommendation: %s (the best final student at the plateau, %s)" % (
        rec["criterion"], "beam 5" if rec["decoding"] == "beam5" else "decoded by " + rec["decoding"])]
    lines += evidence_lines(rec)
    lines += ["  fairseq-train flags: %s" % rec["flags"]] + ["  prepare: %s" % p for p in rec["prepare"]]
    if rec["budget"]:
        lines.append("tight budget: the best checkpoint within a share of plain training's compute to its plateau: "
                     + "; ".join("%gx %s%s" % (b["fraction"], b["criterion"], " (tied with %s within the seeds' spread)"
                                                   % CRITERION[b["runner_up"]] if b.get("within_spread") else "")
                                 for b in rec["budget"]))
        for m in dict.fromkeys(b["method"] for b in rec["budget"] if b["method"] != rec["method"]):
            lines.append("  %s flags: %s" % (CRITERION[m], FLAGS[m]))
    return "\n".join(lines + scope_lines(rec, s, i))


def main(args):
    answer, doc = read_answer(args.answer), read_rule(args.rule)
    start = time.perf_counter()
    result = measure(args)
    result["info"]["seconds"] = time.perf_counter() - start
    result["advice"] = advise(answer, doc, result["signals"])
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
