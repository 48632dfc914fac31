#!/usr/bin/env python3
r"""Speed and peak memory of kd-plugin's criteria, as ratios to fairseq's own label_smoothed_cross_entropy.

    make bench                                  # PYTHONPATH=examples .venv/bin/python benchmarks/bench_kd.py
    PYTHONPATH=examples python benchmarks/bench_kd.py --rounds 5 --warmup 10 --updates 40
    PYTHONPATH=examples python benchmarks/bench_kd.py --data-bin DIR --teacher T.pt   # a real corpus and teacher
    PYTHONPATH=examples python benchmarks/bench_kd.py --synthetic     # ignore the demo's data and teacher

(PYTHONPATH=examples: the examples' library, kdexp, holds the demo's sizes, steps and the configurations.)

Preparation (cached under --work, redone when its arguments change):
  data     --data-bin DIR; else work/demo/data-bin when the demo's teacher checkpoint exists too; else a
           synthetic corpus (4000-type vocabulary, demo-like sentence lengths, target = source). Train and
           valid are subsampled to --train-sentences / --valid-sentences and re-binarized (same dictionaries);
  teacher  --teacher T.pt, else the demo's, else the demo's teacher architecture trained --teacher-updates
           updates here (a valid checkpoint of the right size: its cost, not its quality, is measured);
  cache    kd-dump-teacher --topk K and kd-distill-corpus (train, valid) into ONE directory: --teacher-cache
           of the cached runs (both signals for hybrid_kd), --teacher-targets of the others.
Measurement: --rounds rounds; each round runs every configuration (order rotated per round) as a fresh
fairseq-train (the demo's student and optimizer, --max-tokens 1500), --warmup + --updates updates, with
OMP_NUM_THREADS=--threads (default 1: on a shared machine oversubscribed OpenMP threads wreck timings).
Per run: words/s = fairseq's wps over the train_inner intervals after the warm-up; words/CPU-s = the same
tokens over the child's CPU time between those lines (robust to waiting for a shared core); peak RSS =
ru_maxrss of that child alone (os.wait4). Reported as ratios to the plain run of the same round (median,
min-max). Online-teacher runs are compared to FLOPs floors (bench_report.floors). A loss-level probe (bench_runs.probe)
measures the extra peak memory of each loss in units of one (tokens x vocab) fp32 tensor.
Every configuration and probe (kdexp/configs.py's BENCH and PROBES) spells out every flag of its criterion: no
measurement depends on a criterion default.
Results: a markdown section written between the BEGIN/END markers of --output (docs/PERFORMANCE.md); the raw
numbers in WORK/results.json (each run with its full fairseq-train command, train_cmd), every run's log in
WORK/logs.
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

try:  # the examples' library: make bench runs with PYTHONPATH=examples
    from kdexp.configs import BENCH as CONFIGS, ConfigError
    from kdexp.options import DEFAULTS
    from kdexp.pipeline import REPO, StepFailed, repo_relative
except ModuleNotFoundError as e:
    if e.name != "kdexp":
        raise
    sys.exit("bench_kd: the examples' library kdexp is not importable: run `make bench` or "
             "PYTHONPATH=examples %s benchmarks/bench_kd.py" % os.path.relpath(sys.executable))
from bench_data import Prep, corpus_stats, prepare  # noqa: E402 (after the check that kdexp imports)
from bench_report import floors, report, write_report  # noqa: E402
from bench_runs import config_cmd, measured_tokens, probe, run_measured, run_probes  # noqa: E402

# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default=os.path.join(REPO, "work", "bench"), help="work directory")
    parser.add_argument("--data-bin", help="binarized data dir (default: work/demo/data-bin with the demo's "
                                           "teacher, else a synthetic corpus)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic corpus even if the demo's exists")
    parser.add_argument("--teacher", help="teacher checkpoint (default: the demo's, else one trained here)")
    parser.add_argument("--teacher-updates", type=int, default=30, help="updates of the benchmark's own teacher")
    parser.add_argument("--train-sentences", type=int, default=3500, help="train subset size (0: all)")
    parser.add_argument("--valid-sentences", type=int, default=100, help="valid subset size (0: all)")
    parser.add_argument("--vocab", type=int, default=4000, help="synthetic vocabulary size (specials included)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="updates before measuring (multiple of --log-interval)")
    parser.add_argument("--updates", type=int, default=40, help="measured updates")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--topk", type=int, default=8, help="K of the top-K runs and of the cache")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from %s" % list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every step and run (0: unset)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe-tokens", type=int, default=4096)
    parser.add_argument("--probe-vocab", type=int, default=4000)
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "PERFORMANCE.md"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run one loss probe and print its result
    a = parser.parse_args(argv)
    for key, values in DEFAULTS.items():  # the demo's (full mode) model sizes, warm-up and beam
        if key.startswith(("teacher_", "student_")) or key in ("warmup", "distill_beam"):
            setattr(a, "demo_" + key if key == "warmup" else key, values[0])
    a.configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown or "plain" not in a.configs:
        parser.error("--configs: must include plain; unknown %s (choose from %s)" % (unknown, list(CONFIGS)))
    if a.warmup % a.log_interval or a.updates % a.log_interval or a.updates <= 0:
        parser.error("--warmup and --updates must be multiples of --log-interval (and --updates > 0)")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.probe:
        print(probe(a.probe, a.probe_tokens, a.probe_vocab, a.topk))
        return
    t0 = time.time()
    p = Prep(SimpleNamespace(work=a.work, threads=a.threads))
    env = p.env
    try:
        paths = prepare(a, p)
    except (StepFailed, ConfigError) as e:
        sys.exit("bench_kd: %s" % e)
    stats = corpus_stats(paths["data"], paths["cache"])
    fl = floors(a, stats)
    results = {name: [] for name in a.configs}
    for rnd in range(a.rounds):
        order = a.configs[rnd % len(a.configs):] + a.configs[:rnd % len(a.configs)]
        for name in order:
            log = p.path("logs", "run-r%d-%s.log" % (rnd, name))
            cmd = config_cmd(a, name, paths)
            r = run_measured(cmd, log, env, a.warmup, a.warmup + a.updates)
            r["train_cmd"] = [repo_relative(str(x)) for x in cmd]  # the full command, as run
            if r["rc"] != 0:
                with open(log, errors="replace") as f:
                    sys.stderr.write("".join(f.readlines()[-30:]))
                sys.exit("bench_kd: %s failed (exit %d); log: %s" % (name, r["rc"], log))
            tokens, r["wps"], r["sps"] = measured_tokens(log, a.warmup)
            r["cpu_wps"] = tokens / r["cpu"] if r["cpu"] else float("nan")
            results[name].append(r)
            p.progress("round %d" % rnd, "%-20s %7.0f words/s %7.0f words/CPU-s %5.0f MiB %4.0f s" % (
                name, r["wps"], r["cpu_wps"], r["rss"] / 2 ** 20, r["wall"]))
    with open(p.path("results.json"), "w") as f:
        json.dump({"results": results, "stats": stats, "floors": fl}, f, indent=1)
    p.progress("probe", "loss-level memory probes ...")
    probes = run_probes(a, env)
    section = report(a, paths, results, probes, stats, fl, time.time() - t0)
    write_report(a.output, section)
    print("\n" + section)
    p.progress("bench", "written to %s" % a.output)


if __name__ == "__main__":
    main()
