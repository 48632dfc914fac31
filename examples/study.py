#!/usr/bin/env python3
"""The paper's study on the demo corpus: which KD wins as the scenario gets harder (resumable; docs/STUDY.md).

    .venv/bin/python examples/study.py                       # full grid: 2 seeds, docs/study_results.json
    .venv/bin/python examples/study.py --report --plot docs  # tables (and PNGs) from the records only
    .venv/bin/python examples/study.py --quick               # tiny grid on the demo's --quick corpus (make study-quick)

Scenario cells vary one axis at a time around a shared centre (mid complexity, the demo's student size, beam 5):
  complexity  low / mid / high: students train, validate and are tested on one tercile of the corpus by source
              length in BPE pieces (kdexp/study_levels.py), with the full run's teacher outputs sliced;
  size        --sizes (LAYERS:DIM:FFN:HEADS; the middle one is the centre), at mid complexity;
  decoding    --decodings (DECODINGS: beam 5, greedy, top-10 sampling), the centre students decoded again.
Methods (--methods): plain (label smoothing), token (token_kd from the top-8 teacher cache), sentence
(sentence_kd on the teacher-decoded corpus) and hybrid (hybrid_kd with --hybrid's flags). One teacher for all:
the demo's (examples/demo.py's cached steps build or reuse corpus, BPE, data-bin, teacher, distilled corpus and
cache under --work). Every student trains --updates updates (default --budget-epochs epochs of the FULL corpus,
so a one-third level trains ~3x as many epochs) from scratch with the demo's optimizer, --jobs at a time with
--threads threads each; its validation curve after each epoch is kept. One record per trained and decoded run
(cell, coordinates, method, flags, the full fairseq-train command its step ran (train_cmd, repository-relative
paths), seed, updates, BLEU, chrF and signatures, params, train seconds, validation curve, hypotheses and
references, the level measures, the teacher checkpoint's sha256) is merged into --results; a stopped run resumes.
Every method spells out every flag of its criterion (kdexp/configs.py: compare_mix's configurations and HYBRID):
no run depends on a criterion default. The grid's pieces: kdexp/study.py, kdexp/study_levels.py (complexity
levels), kdexp/study_report.py (tables, plots, the cost estimate).
"""
import argparse
import contextlib
import io
import json
import os
import sys

from kdexp import configs, corpus, study_levels, study_report
from kdexp.configs import METHODS
from kdexp.data import check_user_corpus
from kdexp.options import parse_args as demo_args
from kdexp.pipeline import REPO, Pipeline, StepFailed
from kdexp.study import DECODINGS, SIZES, grid, run_grid, size_name, teacher_epoch_updates


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (no usage block)
        print("study: error: %s" % message, file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = bool(os.environ.get("QUICK")) or "--quick" in argv
    parser = _Parser(description=__doc__.split("\n\n")[0], epilog="Every other flag goes to examples/demo.py "
                     "(--work, --data, sizes of the teacher, --max-tokens, ...).")
    parser.add_argument("--quick", action="store_true", help="tiny grid: the demo's --quick corpus and models, "
                        "1 seed, --updates 30, results in WORK/study_results.json")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from %s" % list(METHODS))
    parser.add_argument("--hybrid", help="hybrid_kd's fairseq-train flags (besides the task and --label-smoothing "
                        "0.1), every flag of the criterion spelled out (checked); placeholders {cache}, {distill}, "
                        "{teacher} (default: kdexp/configs.py's HYBRID, g fixed at 1/2 over the token method's "
                        "settings from the cache)")
    parser.add_argument("--seeds", default="1" if quick else "1,2", help="comma-separated student seeds")
    parser.add_argument("--budget-epochs", type=int, default=3, help="student budget in epochs of the FULL corpus")
    parser.add_argument("--updates", type=int, default=30 if quick else 0, help="student budget in updates "
                        "(0: --budget-epochs x the teacher's updates per epoch)")
    parser.add_argument("--sizes", default=SIZES[quick], help="student sizes LAYERS:DIM:FFN:HEADS, comma-separated, "
                        "an odd number; the middle one is the centre")
    parser.add_argument("--decodings", default=",".join(DECODINGS), help="decoding levels, from %s; the first is "
                        "the centre (every other cell is scored with it)" % list(DECODINGS))
    parser.add_argument("--rare-top", type=int, default=0, help="rare subword = outside the N most frequent "
                        "training source pieces (0: --bpe-size / 4, i.e. 1000 for the demo's 4000)")
    parser.add_argument("--cells", help="run only these cells, comma-separated (default: all; e.g. a third seed "
                        "where methods are close: --seeds 3 --cells centre,complexity-high)")
    parser.add_argument("--jobs", type=int, default=2, help="students trained (and decoded) at the same time")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of each student and decoding")
    parser.add_argument("--results", help="JSON list of records (default: docs/study_results.json; with --quick "
                        "WORK/study_results.json)")
    parser.add_argument("--report", action="store_true", help="only print the tables from --results")
    parser.add_argument("--plot", metavar="DIR", help="also write DIR/study_{complexity,size,decoding}.png")
    parser.add_argument("--estimate", action="store_true", help="only print the grid's cost estimated from "
                        "docs/mix_results.json's 3-epoch timings")
    args, rest = parser.parse_known_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or any(m not in METHODS for m in args.methods):
        parser.error("--methods: %r: choose from %s" % (",".join(args.methods), ", ".join(METHODS)))
    if "plain" not in args.methods:
        parser.error("--methods: plain is needed (every method is reported relative to it)")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.sizes = [tuple(int(x) for x in spec.split(":")) for spec in args.sizes.split(",") if spec]
    except ValueError:
        parser.error("--seeds / --sizes: integers expected (--sizes LAYERS:DIM:FFN:HEADS,...)")
    if not args.seeds:
        parser.error("--seeds: at least one seed")
    bad = [s for s in args.sizes if len(s) != 4 or min(s) < 1 or s[1] % s[3]]
    if bad or len(args.sizes) % 2 == 0:
        parser.error("--sizes: an odd number of LAYERS:DIM:FFN:HEADS (positive, DIM divisible by HEADS), got %s"
                     % (bad or args.sizes))
    args.size_names = [size_name(s) for s in args.sizes]
    args.decodings = [d for d in args.decodings.split(",") if d]
    if not args.decodings or any(d not in DECODINGS for d in args.decodings):
        parser.error("--decodings: %r: choose from %s" % (",".join(args.decodings), ", ".join(DECODINGS)))
    for flag, value, low in (("--updates", args.updates, 0), ("--budget-epochs", args.budget_epochs, 1), ("--jobs",
                             args.jobs, 1), ("--threads", args.threads, 1), ("--rare-top", args.rare_top, 0)):
        if value < low:
            parser.error("%s must be >= %d (got %d)" % (flag, low, value))
    if args.hybrid is not None:  # a run must not depend on a criterion default
        missing = configs.missing_flags(configs.method_flags(args.hybrid)["hybrid"])
        if missing:
            parser.error("--hybrid: give every flag of the criterion (missing %s)" % " ".join(missing))
    args.axis_levels = {"complexity": study_levels.LEVELS, "size": args.size_names, "decoding": args.decodings}
    names = [cell for cell, _ in grid(args)]
    args.cells = [c for c in args.cells.split(",") if c] if args.cells else names
    if not args.cells or any(c not in names for c in args.cells):
        parser.error("--cells: %r: choose from %s" % (",".join(args.cells), ", ".join(names)))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = demo_args(rest + ["--students", "plain"] + (["--quick"] if quick else []))
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["bad arguments"])[-1]
        parser.error(last.split("error: ", 1)[-1])
    a.jobs = args.jobs
    args.rare_top = args.rare_top or max(1, a.bpe_size // 4)
    args.results = args.results or (os.path.join(a.work, "study_results.json") if quick
                                    else os.path.join(REPO, "docs", "study_results.json"))
    return args, a


def main(argv=None):
    args, a = parse_args(argv)
    if args.estimate:
        print(study_report.estimate(os.path.join(REPO, "docs", "mix_results.json"), args, grid(args), a.bpe_size))
        return
    if not args.report:
        if a.data:
            try:
                check_user_corpus(a)
            except corpus.CorpusError as e:
                print("study: error: %s" % e, file=sys.stderr)
                sys.exit(2)
        try:
            run_grid(Pipeline(a), args)
        except (StepFailed, corpus.CorpusError) as e:
            sys.exit("study: %s" % e)
    elif not args.updates and os.path.isfile(os.path.join(a.work, "logs", "train-teacher.log")):
        args.updates = args.budget_epochs * teacher_epoch_updates(Pipeline(a))
    if not os.path.isfile(args.results):
        print("study: error: %s: no records yet (run the grid first)" % args.results, file=sys.stderr)
        sys.exit(2)
    with open(args.results) as f:
        records = json.load(f)
    print(study_report.report(records, args, grid(args)))
    print("\nvalidation curves (mean over seeds)\n\n" + study_report.curves(records, args, grid(args)))
    if "token" in args.methods and "sentence" in args.methods:
        print("\n" + study_report.SIGNIFICANCE_CAPTION + "\n\n" + study_report.significance(records, args, grid(args)))
    if args.plot:
        study_report.plot(records, args, grid(args), args.plot)
        study_report.plot_curves(records, args, grid(args), args.plot)


if __name__ == "__main__":
    main()
