#!/usr/bin/env python3
"""The paper's study on the demo corpus: which KD wins as the scenario gets harder (resumable; docs/STUDY.md).

    .venv/bin/python examples/study.py                       # full grid: 2 seeds, docs/study_results.json
    .venv/bin/python examples/study.py --report --plot docs  # tables (and PNGs) from the records only
    .venv/bin/python examples/study.py --quick               # tiny grid on the demo's --quick corpus (make study-quick)

Scenario cells vary one axis at a time around a shared centre (mid complexity, the demo's student size, beam 5):
  complexity  low / mid / high: students train, validate and are tested on one tercile of the corpus by source
              length in BPE pieces (examples/study_levels.py), with the full run's teacher outputs sliced;
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
references, the level measures) is merged into --results; a stopped run resumes. Every method spells out every
flag of its criterion (compare_mix's CONFIGS, HYBRID here): no run depends on a criterion default.
"""
import argparse
import concurrent.futures
import contextlib
import copy
import io
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_mix  # noqa: E402
import demo  # noqa: E402
import study_levels  # noqa: E402
import study_report  # noqa: E402
from demo_pipeline import REPO, StepFailed, read_lines, write_lines  # noqa: E402

K = compare_mix.K
# hybrid_kd with every flag spelled out (the study's records ran the criterion's then-default fixed:0.5 mix, with
# token_kd's settings of the token method): token-level half = compare_mix's token-cache8, g(x) fixed at 1/2
HYBRID = ("--criterion hybrid_kd --kd-alpha 0.5 --kd-temperature 1 --kd-divergence forward_kl --kd-js-beta 0.5 "
          "--kd-skew-lambda 0.1 --kd-topk %d --kd-select all --kd-select-rate 0.5 --kd-select-queue 30000 "
          "--kd-gate fixed:0.5 --kd-gate-tau 1 --kd-gate-weight 1 --kd-gate-momentum 0.99 --kd-gate-hidden 64 "
          "--teacher-cache {cache} --teacher-targets {distill}" % K)
METHODS = ("plain", "token", "sentence", "hybrid")
# fairseq-generate flags of each decoding level, appended to the demo's test decoding (beam 5, length cap)
DECODINGS = {"beam5": ["--beam", "5"], "greedy": ["--beam", "1"],
             "sample": ["--beam", "1", "--sampling", "--sampling-topk", "10", "--seed", "1"]}
SIZES = ("1:32:128:2,1:64:256:2,2:80:320:4", "1:16:32:2,1:32:64:2,1:48:96:2")  # (full, quick)
MAX_EPOCHS = 100000  # students stop at --updates


def method_flags(hybrid):
    """fairseq-train arguments of each method (placeholders {user_dir}, {cache}, {distill})."""
    c = compare_mix.CONFIGS
    return {"plain": c["plain"], "token": c["token-cache8"], "sentence": c["sentence"],
            "hybrid": compare_mix.KD + shlex.split(hybrid) + compare_mix.LS}


def missing_criterion_flags(flags):
    """The flags of the criterion named in ``flags`` (its registered dataclass's fields, less fairseq's own
    label_smoothed_cross_entropy fields other than --label-smoothing) that ``flags`` does not give."""
    import dataclasses

    import kd_plugin  # noqa: F401  (registers the criteria)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY as registry

    criterion = flags[flags.index("--criterion") + 1] if "--criterion" in flags[:-1] else None
    if criterion not in registry:
        return ["--criterion (one of %s)" % ", ".join(sorted(registry))]
    fairseq_own = {f.name for f in dataclasses.fields(registry["label_smoothed_cross_entropy"])} - {"label_smoothing"}
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(registry[criterion])
            if f.name not in fairseq_own and "--" + f.name.replace("_", "-") not in flags]


def size_name(arch):
    return "l%d-d%d-f%d-h%d" % arch


def run_name(method, size, seed, updates):
    return "%s-%s-s%d-u%d" % (method, size, seed, updates)


def grid(args):
    """[(cell, {"complexity", "size", "decoding"})], the centre first, then one axis varied at a time."""
    centre = {"complexity": "mid", "size": args.size_names[len(args.sizes) // 2], "decoding": args.decodings[0]}
    cells = [("centre", centre)]
    for axis, levels in args.axis_levels.items():
        cells += [("%s-%s" % (axis, lv), dict(centre, **{axis: lv})) for lv in levels if lv != centre[axis]]
    return cells


def dump_cache(p):
    """The top-K teacher cache of the gold prefixes (kd-dump-teacher): the demo's (and compare_mix's) steps."""
    return compare_mix.dump_cache(p)


def level_view(p, level):
    """The pipeline ``p`` working in WORK/study/LEVEL (its own data-bin, distill, cache8, ckpt, logs, done)."""
    view = copy.copy(p)
    view.work = p.path("study", level)
    for sub in ("logs", "done"):
        os.makedirs(view.path(sub), exist_ok=True)
    return view


def prepare_levels(p, args, need):
    """Complexity levels (cached steps): thresholds and measures, then each level's sliced data, distilled
    targets and cache. Returns levels.json's content."""
    out = p.path("study", "levels.json")
    os.makedirs(p.path("study"), exist_ok=True)
    p.step("study-levels", lambda: study_levels.write_json(out, study_levels.split_levels(p, args.rare_top)),
           {"score": "source BPE length", "rare_top": args.rare_top})
    with open(out) as f:
        info = json.load(f)
    a, pair = p.args, "%s-%s" % (p.args.src_lang, p.args.tgt_lang)
    for lv in study_levels.LEVELS:
        lp, ids = level_view(p, lv), info["ids"][lv]
        note = {"level": lv, "thresholds": info["thresholds"], "of": p.work}
        lp.step("subset-data", lambda lp=lp, ids=ids: study_levels.subset_data(p, lp, ids))
        if "{distill}" in need:
            lp.step("subset-distill", lambda lp=lp, ids=ids, note=note: [study_levels.subset_distill(
                p.path("distill"), lp.path("distill"), "%s.%s.%s" % (s, pair, a.tgt_lang), ids[s], note)
                for s in ("train", "valid")])
        if "{cache}" in need:
            lp.step("subset-cache", lambda lp=lp, ids=ids, note=note: [study_levels.subset_cache(
                need["{cache}"], lp.path("cache%d" % K), s, ids[s], note) for s in ("train", "valid")])
    return info


def decode(p, tag, ckpt, decoding):
    """Decode the level's test set with checkpoint ``ckpt`` (cached step eval-TAG-DECODING) and score it."""
    from sacrebleu.metrics import BLEU, CHRF

    step = "eval-%s-%s" % (tag, decoding)
    cmd = demo.generate_cmd(p, tag)
    cmd[cmd.index("--path") + 1] = ckpt
    p.run(step, cmd + DECODINGS[decoding])
    refs_path = p.path("corpus", "test.%s" % p.args.tgt_lang)
    refs = read_lines(refs_path)
    hyps = demo.hypotheses(p.path("logs", step + ".log"), len(refs))
    os.makedirs(p.path("eval"), exist_ok=True)
    write_lines(p.path("eval", "%s-%s.hyp" % (tag, decoding)), hyps)
    bleu, chrf = BLEU(), CHRF()
    return {"bleu": bleu.corpus_score(hyps, [refs]).score, "chrf": chrf.corpus_score(hyps, [refs]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
            "hyps": os.path.relpath(p.path("eval", "%s-%s.hyp" % (tag, decoding)), REPO),
            "refs": os.path.relpath(refs_path, REPO)}


def student(p, args, paths, level, size, method, seed, cells):
    """Train one student (cached) and decode it for each of ``cells`` (cell, coordinates): its records."""
    view = copy.copy(p)
    view.args = a = copy.copy(p.args)
    a.seed, a.student_epochs, a.max_update = seed, MAX_EPOCHS, args.updates
    a.student_layers, a.student_dim, a.student_ffn, a.student_heads = args.sizes[args.size_names.index(size)]
    name = run_name(method, size, seed, args.updates)
    flags = [str(f).format(**paths) for f in args.method_flags[method]]
    demo.train(view, name, "student", flags)
    curve = compare_mix.valid_curve(view, name)
    common = {"method": method, "flags": [study_report.repo_relative(f) for f in flags],
              "train_cmd": demo.recorded_train_cmd(view, name), "seed": seed,
              "updates": demo.trained_updates(view, name), "params": demo.count_params(demo.checkpoint(view, name)),
              "epochs": round(curve[-1]["updates"] / curve[0]["updates"], 2) if curve else None,
              "train_seconds": round(view.cached("train-" + name)["seconds"], 1), "valid": curve,
              "work": os.path.relpath(view.work, REPO)}
    records = []
    for cell, coords in cells:
        scores = decode(view, name, demo.checkpoint(view, name), coords["decoding"])
        view.progress(name, "%s: BLEU %.2f chrF %.2f" % (cell, scores["bleu"], scores["chrf"]))
        records.append(dict(cell=cell, **coords, **common, **scores))
    return records


def measures(r, info, teacher, teacher_params, args):
    """The measures of the record's level on each axis: complexity (per split: pairs, mean source length,
    rare-subword rate; the teacher's BLEU/chrF on the level's test set), size (params, ratio to the
    teacher's), decoding (flags; the teacher's BLEU/chrF with them on the mid level's test set)."""
    def teacher_scores(key):
        t = teacher.get(key) or {}
        return {"teacher_bleu": t.get("bleu"), "teacher_chrf": t.get("chrf")}

    lv, dec = r["complexity"], r["decoding"]
    return {"complexity": dict(info["measures"][lv], score=info["score"], thresholds=info["thresholds"],
                               rare_top=info["rare_top"], **teacher_scores("%s/%s" % (lv, args.decodings[0]))),
            "size": {"arch": r["size"], "params": r["params"], "teacher_params": teacher_params,
                     "ratio": r["params"] / teacher_params},
            "decoding": dict(flags=DECODINGS[dec], **teacher_scores("mid/%s" % dec))}


def jobs(args, cells):
    """Teacher decodings (level measures), then students, slowest method first:
    [(kind, level, size, method, seed, cells of the student | decoding of the teacher)]."""
    needed = {(c["complexity"], args.decodings[0]) for _, c in cells} | {("mid", c["decoding"]) for _, c in cells}
    teacher = [("teacher", level, None, None, None, decoding) for level, decoding in sorted(needed)]
    trainings = {}
    for cell, coords in cells:
        trainings.setdefault((coords["complexity"], coords["size"]), []).append((cell, coords))
    order = sorted(args.methods, key=study_report.ORDER.index)  # slowest first
    students = [("student", lv, size, m, seed, cs) for seed in args.seeds for m in order
                for (lv, size), cs in trainings.items()]
    return teacher + students


def teacher_epoch_updates(p):
    """Updates per epoch of the full corpus: the teacher's first validation (end of its epoch 1; same data and
    --max-tokens as the students, batched by the gold targets)."""
    curve = compare_mix.valid_curve(p, "teacher")
    if not curve:
        raise StepFailed("%s: no validation in the teacher's log" % p.path("logs", "train-teacher.log"))
    return curve[0]["updates"]


def run_grid(p, args):
    """Build or reuse every step; returns (records, teacher measures {level/decoding: scores})."""
    demo.build_teacher(p)
    if not args.updates:
        per_epoch = teacher_epoch_updates(p)
        args.updates = args.budget_epochs * per_epoch
        p.progress("study", "budget: %d updates = %d epochs of the full corpus (%d updates per epoch)"
                   % (args.updates, args.budget_epochs, per_epoch))
    flags = " ".join(str(f) for m in args.methods for f in args.method_flags[m])
    need = {}
    if "{distill}" in flags:
        for split in ("train", "valid"):
            demo.distill(p, split)
        need["{distill}"] = p.path("distill")
    if "{cache}" in flags:
        need["{cache}"] = dump_cache(p)
    info = prepare_levels(p, args, need)
    cells = [(cell, coords) for cell, coords in grid(args) if cell in args.cells]
    view = p.with_threads(args.threads)
    teacher_ckpt = demo.checkpoint(p, "teacher")
    records, teacher, failed = [], {}, []

    def job(kind, level, size, method, seed, extra):
        lp = level_view(view, level)
        if kind == "teacher":
            teacher["%s/%s" % (level, extra)] = decode(lp, "teacher", teacher_ckpt, extra)
            return []
        paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "distill": lp.path("distill"),
                 "cache": lp.path("cache%d" % K), "teacher": teacher_ckpt}
        return student(lp, args, paths, level, size, method, seed, extra)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(job, *j) for j in jobs(args, cells)]
        for future in futures:  # keep every finished record even if a later run fails
            try:
                records += future.result()
            except StepFailed as e:
                failed.append(str(e))
                print("study: %s" % e, file=sys.stderr)
    teacher_params = demo.count_params(teacher_ckpt)
    for r in records:
        r["measures"] = measures(r, info, teacher, teacher_params, args)
    study_levels.write_json(p.path("study", "teacher.json"), {"params": teacher_params, "scores": teacher})
    study_report.merge_records(args.results, records)
    if failed:
        sys.exit("study: %d runs failed (see above); rerun to retry them" % len(failed))


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
    parser.add_argument("--hybrid", default=HYBRID, help="hybrid_kd's fairseq-train flags (besides the task and "
                        "--label-smoothing 0.1), every flag of the criterion spelled out (checked); placeholders "
                        "{cache}, {distill}, {teacher}")
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
    args.method_flags = method_flags(args.hybrid)
    if args.hybrid != HYBRID:  # a run must not depend on a criterion default
        missing = missing_criterion_flags([str(f) for f in args.method_flags["hybrid"]])
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
            a = demo.parse_args(rest + ["--students", "plain"] + (["--quick"] if quick else []))
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
                demo.check_user_corpus(a)
            except demo.build_corpus.CorpusError as e:
                print("study: error: %s" % e, file=sys.stderr)
                sys.exit(2)
        try:
            run_grid(demo.Pipeline(a), args)
        except (StepFailed, demo.build_corpus.CorpusError) as e:
            sys.exit("study: %s" % e)
    elif not args.updates and os.path.isfile(os.path.join(a.work, "logs", "train-teacher.log")):
        args.updates = args.budget_epochs * teacher_epoch_updates(demo.Pipeline(a))
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
