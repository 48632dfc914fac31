#!/usr/bin/env python3
"""Fit kd-advise's rule on the study (docs/STUDY.md, "kd-advise"); review it, then write kd_plugin/advise_rule.json.

    .venv/bin/python examples/study_advise.py [--results docs/study_results.json] [--work work/demo]   # review
    .venv/bin/python examples/study_advise.py ... --write                                        # then write

The rule file is package data (kd-advise's default --rule): a run prints the fitted rule, its table and a
unified diff against --out and writes nothing; --write writes --out (the shipped file by default) after the
same review output. Commit the file with the diff's reason.

For every study cell: the scenario's signals, measured exactly as kd-advise measures a user's (kd_plugin.cli
.advise.measure on the cell's level data-bin, the study's teacher, the cell's student architecture and
decoding), and each method's BLEU averaged over the seeds that every method of the cell has. Then the rule of
least BLEU lost over all cells (kd_plugin.advice.fit_rule), its leave-one-cell-out accuracy and BLEU lost
(the cell's rule refitted without it), and a markdown table of both on stdout. Nothing is trained; the teacher
runs on --sample sentences per complexity level (seconds).
"""
import argparse
import datetime
import difflib
import json
import os
import shlex
import statistics
import sys

from kdexp.pipeline import REPO
from kdexp.recipes import model_args

from kd_plugin import advice
from kd_plugin.cli import advise

SCOPE = ("one teacher (the demo's 2+2-layer d=128 transformer, 1.43M parameters, 3 epochs) on one corpus "
         "(LibreOffice help de-en), students trained 2,049 updates: a prior from docs/STUDY.md, not a guarantee")
DECODING = {"beam5": (5, False), "greedy": (1, False), "sample": (1, True)}  # kdexp.study.DECODINGS as kd-advise flags


def arch_flags(size):
    """fairseq flags of a study size name ``l{layers}-d{dim}-f{ffn}-h{heads}`` (recipes.model_args)."""
    layers, dim, ffn, heads = (int(part[1:]) for part in size.split("-"))
    a = argparse.Namespace(student_layers=layers, student_dim=dim, student_ffn=ffn, student_heads=heads)
    return " ".join(str(f) for f in model_args(a, "student"))


def cell_table(records, methods):
    """[{"cell", "coords", "seeds", "bleu": {method: mean}, "std": {method: std}}] over the seeds shared by
    every method of the cell (cells missing a method are left out)."""
    by_cell = {}
    for r in records:
        by_cell.setdefault(r["cell"], []).append(r)
    out = []
    for cell, rs in sorted(by_cell.items()):
        seeds = set.intersection(*[{r["seed"] for r in rs if r["method"] == m} for m in methods])
        if not seeds:
            continue
        scores = {m: [r["bleu"] for r in rs if r["method"] == m and r["seed"] in seeds] for m in methods}
        out.append({"cell": cell, "coords": {k: rs[0][k] for k in ("complexity", "size", "decoding")},
                    "seeds": sorted(seeds), "bleu": {m: statistics.mean(v) for m, v in scores.items()},
                    "std": {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in scores.items()}})
    return out


def measure_cell(args, coords):
    """kd-advise's signals for a study cell."""
    beam, sampling = DECODING[coords["decoding"]]
    argv = ["--data", os.path.join(args.work, "study", coords["complexity"], "data-bin"), "--teacher", args.teacher,
            "--student-arch", arch_flags(coords["size"]), "--sample", str(args.sample), "--beam", str(beam)]
    return advise.measure(advise.get_parser().parse_args(argv + (["--sampling"] if sampling else [])))


def constant_losses(cells):
    """{method: (mean, max) over cells of best BLEU - the method's BLEU}: the baselines of the rule."""
    lost = {m: [max(c["bleu"].values()) - c["bleu"][m] for c in cells] for m in cells[0]["bleu"]}
    return {m: (statistics.mean(v), max(v)) for m, v in lost.items()}


def markdown(cells, loo, rule):
    rows = ["| cell | " + " | ".join(advice.SIGNALS) + " | best (BLEU) | LOO rule | LOO pick | BLEU lost |",
            "|---|" + "---:|" * len(advice.SIGNALS) + "---|---|---|---:|"]
    for c, o in zip(cells, loo):
        sig = " | ".join("%.3g" % c["signals"][s] for s in advice.SIGNALS)
        rows.append("| %s | %s | %s (%.2f) | %s | %s | %.2f |" % (
            c["cell"], sig, o["best"], c["bleu"][o["best"]], advise.describe_rule(o["rule"]), o["pick"],
            o["bleu_lost"]))
    acc = sum(o["correct"] for o in loo) / len(loo)
    rows.append("\nBLEU lost per cell if one method is always used (mean, max): " + ", ".join(
        "%s %.2f, %.2f" % (m, mean, worst) for m, (mean, worst) in constant_losses(cells).items()) + ".")
    rows.append("\nRule fitted on all %d cells: %s. Leave-one-cell-out: %d/%d correct (%.0f%%), mean BLEU lost "
                "%.2f, max %.2f." % (len(cells), advise.describe_rule(rule), sum(o["correct"] for o in loo),
                                     len(loo), 100 * acc, statistics.mean(o["bleu_lost"] for o in loo),
                                     max(o["bleu_lost"] for o in loo)))
    return "\n".join(rows)


def review(path, doc):
    """The fitted rule and a unified diff of ``path`` against ``doc`` (its "fitted" block, date and command,
    included): what --write would change."""
    new = json.dumps(doc, indent=1).splitlines()
    old = open(path).read().splitlines() if os.path.isfile(path) else []
    diff = list(difflib.unified_diff(old, new, path, path + " (fitted now)", lineterm=""))
    shown = "\n".join(diff) if diff else "no change to %s" % path
    return "\nRule: %s\n\n%s" % (advise.describe_rule(doc["rule"]), shown)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(REPO, "docs", "study_results.json"))
    parser.add_argument("--work", default=os.path.join(REPO, "work", "demo"), help="the study's work directory")
    parser.add_argument("--teacher", default=None, help="default: WORK/ckpt/teacher/checkpoint_last.pt")
    parser.add_argument("--methods", default="plain,token,sentence,hybrid")
    parser.add_argument("--sample", type=int, default=500, help="kd-advise --sample")
    parser.add_argument("--out", default=advise.RULE, help="the rule file (default: the shipped one)")
    parser.add_argument("--write", action="store_true", help="write --out (without it: print the rule and the diff "
                        "against --out only)")
    parser.add_argument("--scope", default=SCOPE, help="what the rule was fitted on, printed by kd-advise")
    args = parser.parse_args(argv)
    args.teacher = args.teacher or os.path.join(args.work, "ckpt", "teacher", "checkpoint_last.pt")
    methods = args.methods.split(",")
    with open(args.results) as f:
        cells = cell_table(json.load(f), methods)
    for c in cells:
        m = measure_cell(args, c["coords"])
        c["signals"] = m["signals"]
        c["params"] = {k: m["info"][k] for k in ("student_params", "teacher_params")}
    rule = advice.fit_rule(cells, methods)
    loo = advice.leave_one_out(cells, methods)
    doc = {"version": 1, "methods": methods, "signals": list(advice.SIGNALS), "rule": rule, "cells": cells,
           "loo": {"cells": len(loo), "accuracy": sum(o["correct"] for o in loo) / len(loo),
                   "bleu_lost_mean": statistics.mean(o["bleu_lost"] for o in loo),
                   "bleu_lost_max": max(o["bleu_lost"] for o in loo), "per_cell": loo,
                   "always": {m: {"bleu_lost_mean": v[0], "bleu_lost_max": v[1]}
                              for m, v in constant_losses(cells).items()}},
           "fitted": {"command": "examples/study_advise.py " + " ".join(
               shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--write"),
                      "results": os.path.relpath(args.results, REPO), "sample": args.sample,
                      "date": datetime.date.today().isoformat(), "scope": args.scope}}
    print(markdown(cells, loo, rule))
    print(review(args.out, doc))
    if args.write:
        with open(args.out + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print("written: %s" % args.out)
    else:
        print("not written (review the diff, then rerun with --write)")


if __name__ == "__main__":
    main()
