#!/usr/bin/env python3
"""Multi-seed comparison of KD configurations on the demo corpus with the demo's teacher (resumable).

    .venv/bin/python examples/compare_mix.py --configs token-full,token-cache8 --seeds 1,2,3 --epochs 3
    .venv/bin/python examples/compare_mix.py --configs ... --seeds ... --epochs 3 --report   # table only

It runs examples/demo.py's pipeline in the demo's work directory (corpus, BPE, data-bin, teacher and the
distilled corpus are built if missing and reused otherwise: the same cached steps), dumps a top-K teacher
cache when a configuration needs one, then trains one student per (configuration, seed) with the demo's
student size, optimizer and data for ``--epochs`` epochs, ``--jobs`` at a time, and scores each with stock
fairseq-generate + sacreBLEU. Each configuration (kdexp/configs.py's MIX) spells out every flag of its criterion,
so no run depends on a criterion default. Each run appends one record to ``--results`` (default
docs/mix_results.json: configuration, its flags, the full fairseq-train command the run's step ran (``train_cmd``,
from its done-marker, paths relative to the repository), the teacher checkpoint's sha256, seed, epochs, updates,
BLEU, chrF and their signatures, train seconds, the validation loss/nll/ppl after each epoch). The pieces:
kdexp/mix.py. A stopped run resumes: finished steps are skipped.

The report gives, per configuration, mean and standard deviation over seeds and the paired bootstrap
(1,000 resamples of test sentences, seeds pooled: each resample draws the same sentence ids in every seed)
of each configuration against ``--baseline``: the MEAN over the resamples of the BLEU difference (not the
difference of the BLEU means in the same table), its 95% interval and p = the share of resamples where the
difference is <= 0. Records of retired configurations (configs.RETIRED: modes that left kd-plugin) stay readable:
``--report --configs mix-word,...`` shows them, marked "(retired)", with the flags their records stored.
"""
import argparse
import concurrent.futures
import json
import os
import sys

from kdexp import corpus, recipes
from kdexp.configs import MIX, RETIRED
from kdexp.mix import merge_records, measure_speed, plot, recorded_configs, report, speed_report, train_and_score
from kdexp.options import parse_args as demo_args
from kdexp.pipeline import REPO, Pipeline, StepFailed, read_lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="token-full,token-cache8", help="comma-separated, from %s" % list(MIX))
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated student seeds")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs")
    parser.add_argument("--baseline", default=None, help="configuration the others are tested against "
                                                         "(default: the first of --configs)")
    parser.add_argument("--results", default=os.path.join(REPO, "docs", "mix_results.json"))
    parser.add_argument("--report", action="store_true", help="only print the table from --results")
    parser.add_argument("--plot", help="also write a PNG: BLEU per configuration and seed, validation curves")
    parser.add_argument("--speed", type=int, default=0, metavar="REPS",
                        help="also export every run to CTranslate2 int8 and time both decoding paths, interleaved "
                             "over REPS rounds, one thread (the demo's speed phase); 0: no timing")
    args, rest = parser.parse_known_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    known = set(MIX) | (recorded_configs(args.results) if args.report else set())
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        retired = [c for c in unknown if c in RETIRED]
        parser.error("--configs: unknown %s (choose from %s)%s" % (unknown, ", ".join(MIX), (
            "; %s retired: only --report shows their records" % ", ".join(retired)) if retired else ""))
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error("--seeds: comma-separated integers, got %r" % args.seeds)
    if args.epochs < 1 or not args.seeds or args.speed < 0:
        parser.error("--epochs must be >= 1, --seeds non-empty and --speed >= 0")
    args.baseline = args.baseline or args.configs[0]
    return args, demo_args(rest + ["--students", "plain"])  # demo's flags: sizes, --work, --jobs, --quick


def main(argv=None):
    args, a = parse_args(argv)
    a.epochs = args.epochs
    p = Pipeline(a)
    refs_path = p.path("corpus", "test.%s" % a.tgt_lang)
    if not args.report:
        try:
            recipes.build_teacher(p)
            flags = " ".join(str(f) for c in args.configs for f in MIX[c].flags())
            if "{distill}" in flags:
                for split in ("train", "valid"):
                    recipes.distill(p, split)
            paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": recipes.checkpoint(p, "teacher"),
                     "distill": p.path("distill"), "cache": recipes.dump_cache(p) if "{cache}" in flags else None}
            view = p.with_threads(recipes.student_threads(a))
            runs = [(c, s) for s in args.seeds for c in args.configs]
            with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
                futures = [pool.submit(train_and_score, view, c, s, paths) for c, s in runs]
                records = []
                for future in futures:  # keep every finished record even if a later run fails
                    try:
                        records.append(future.result())
                    except StepFailed as e:
                        print("compare_mix: %s" % e, file=sys.stderr)
            if args.speed and len(records) == len(runs):
                records = measure_speed(p, records, args.speed)
            merge_records(args.results, records)
            if len(records) < len(runs):
                sys.exit("compare_mix: %d of %d runs failed (see above); rerun to retry them"
                         % (len(runs) - len(records), len(runs)))
        except (StepFailed, corpus.CorpusError) as e:
            sys.exit("compare_mix: %s" % e)
    with open(args.results) as f:
        records = json.load(f)
    refs = read_lines(refs_path) if os.path.isfile(refs_path) else None
    print(report(records, args.configs, args.seeds, args.epochs, args.baseline, refs))
    chosen = [r for r in records if r["config"] in args.configs and r["seed"] in args.seeds
              and r["epochs"] == args.epochs]
    if any("ct2_speed" in r for r in chosen):
        print(speed_report(chosen, args.configs))
    if args.plot:
        plot(records, args.configs, args.seeds, args.epochs, args.plot)


if __name__ == "__main__":
    main()
