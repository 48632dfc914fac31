"""The study's grid (examples/study.py): scenario cells around a centre, each complexity level's data as a
sliced view of the demo's work directory (kdexp/study_levels.py), one student per (level, size, method, seed)
trained for a fixed number of updates and decoded for each of its cells, the teacher decoded per level, and the
records (with each level's measures and the teacher checkpoint's sha256) merged into the results file.
"""
import concurrent.futures
import copy
import json
import os
import sys

from kdexp import configs, recipes, study_levels, study_report
from kdexp.configs import CACHE_TOPK as K
from kdexp.mix import valid_curve
from kdexp.pipeline import REPO, StepFailed, read_lines, repo_relative, write_lines

# fairseq-generate flags of each decoding level, appended to the demo's test decoding (beam 5, length cap)
DECODINGS = {"beam5": ["--beam", "5"], "greedy": ["--beam", "1"],
             "sample": ["--beam", "1", "--sampling", "--sampling-topk", "10", "--seed", "1"]}
SIZES = ("1:32:128:2,1:64:256:2,2:80:320:4", "1:16:32:2,1:32:64:2,1:48:96:2")  # (full, quick)
MAX_EPOCHS = 100000  # students stop at --updates


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
    cmd = recipes.generate_cmd(p, tag)
    cmd[cmd.index("--path") + 1] = ckpt
    p.run(step, cmd + DECODINGS[decoding])
    refs_path = p.path("corpus", "test.%s" % p.args.tgt_lang)
    refs = read_lines(refs_path)
    hyps = recipes.hypotheses(p.path("logs", step + ".log"), len(refs))
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
    recipes.train(view, name, "student", flags)
    curve = valid_curve(view, name)
    common = {"method": method, "flags": [repo_relative(f) for f in flags],
              "train_cmd": recipes.recorded_train_cmd(view, name), "seed": seed,
              "updates": recipes.trained_updates(view, name),
              "params": recipes.count_params(recipes.checkpoint(view, name)),
              "epochs": round(curve[-1]["updates"] / curve[0]["updates"], 2) if curve else None,
              "train_seconds": round(view.cached("train-" + name)["seconds"], 1), "valid": curve,
              "work": os.path.relpath(view.work, REPO), "teacher_sha256": args.teacher_sha256}
    records = []
    for cell, coords in cells:
        scores = decode(view, name, recipes.checkpoint(view, name), coords["decoding"])
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
    curve = valid_curve(p, "teacher")
    if not curve:
        raise StepFailed("%s: no validation in the teacher's log" % p.path("logs", "train-teacher.log"))
    return curve[0]["updates"]


def run_grid(p, args):
    """Build or reuse every step; returns (records, teacher measures {level/decoding: scores})."""
    args.method_flags = configs.method_flags(args.hybrid)
    recipes.build_teacher(p)
    if not args.updates:
        per_epoch = teacher_epoch_updates(p)
        args.updates = args.budget_epochs * per_epoch
        p.progress("study", "budget: %d updates = %d epochs of the full corpus (%d updates per epoch)"
                   % (args.updates, args.budget_epochs, per_epoch))
    flags = " ".join(str(f) for m in args.methods for f in args.method_flags[m])
    need = {}
    if "{distill}" in flags:
        for split in ("train", "valid"):
            recipes.distill(p, split)
        need["{distill}"] = p.path("distill")
    if "{cache}" in flags:
        need["{cache}"] = recipes.dump_cache(p)
    info = prepare_levels(p, args, need)
    args.teacher_sha256 = recipes.teacher_sha256(p)
    cells = [(cell, coords) for cell, coords in grid(args) if cell in args.cells]
    view = p.with_threads(args.threads)
    teacher_ckpt = recipes.checkpoint(p, "teacher")
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
    teacher_params = recipes.count_params(teacher_ckpt)
    for r in records:
        r["measures"] = measures(r, info, teacher, teacher_params, args)
    study_levels.write_json(p.path("study", "teacher.json"), {"params": teacher_params, "scores": teacher})
    study_report.merge_records(args.results, records)
    if failed:
        sys.exit("study: %d runs failed (see above); rerun to retry them" % len(failed))
