#!/usr/bin/env python3
"""End-to-end kd-plugin demo: a German->English teacher (or any pair with --data), then four equally-sized
students trained with the same budget (plain label smoothing, token-level KD, sentence-level KD, hybrid KD;
the token-level signals from a top-8 teacher cache), all scored with stock ``fairseq-generate`` and
sacreBLEU, exported to CTranslate2 int8 and timed on the test set (both paths, one thread).

    make demo                          # .venv/bin/python examples/demo.py  (measured times: docs/DEMO.md)
    make demo-quick                    # QUICK=1: 3k-pair subset, tiny models (a smoke run, not timed)
    python examples/demo.py --data fr-en.tsv --src-lang fr --tgt-lang en --students plain,token
    python examples/demo.py --help     # all sizes

Pipeline (every step is cached under WORK: delete a step's output or WORK/done/STEP.json to redo it):
corpus (kdexp/corpus.py: cleaned, split) -> sentencepiece joint BPE (kdexp/data.py) ->
fairseq-preprocess --joined-dictionary -> teacher (fairseq-train) -> kd-distill-corpus (train, valid) ->
kd-dump-teacher top-8 cache (train, valid) -> students -> fairseq-generate + sacreBLEU, kd-export int8 ->
speed phase (kdexp/speed.py) -> a markdown table (kdexp/report.py) printed and written to
WORK/results.md (the scores also as WORK/results.json, each with the teacher checkpoint's sha256); a full run on
the default corpus also writes docs/DEMO.md (a --data run never does).
Steps run through kdexp/pipeline.py; the commands are kdexp/recipes.py's, the students' flags
kdexp/configs.py's STUDENTS (every flag of each criterion spelled out), the flags kdexp/options.py's.
A malformed --data TSV (or too few pairs for the split) stops before anything is written: one line naming the
file, exit status 2.
"""
import concurrent.futures
import json
import os
import sys

from kdexp import corpus as build_corpus
from kdexp.data import check_user_corpus
from kdexp.options import parse_args
from kdexp.pipeline import REPO, Pipeline, StepFailed, write_lines
from kdexp.plateau_gap import PlateauTeacherError, check_plateau_teacher, install_plateau_teacher
from kdexp.recipes import (build_teacher, checkpoint, cost_rank, distill, dump_cache, evaluate, generate_cmd, needs,
                           prepare_data, shape, student_args, student_threads, teacher_sha256, train)
from kdexp.report import report
from kdexp.speed import export, inference_columns


def train_students(p):
    """Train and score every student, ``--jobs`` at a time with ``--threads`` (default: cores / jobs) threads
    each: small models use a second core better as a second process than as a second intra-op thread.
    The costliest students start first (cost_rank). Each is exported (kd-export int8) after its scoring.
    Returns {name: scores}."""
    a = p.args
    view = p.with_threads(student_threads(a))
    order = sorted(a.students, key=cost_rank)  # stable

    def student(name):
        train(view, name, "student", student_args(view, name))
        result = evaluate(view, name)
        p.progress(name, "BLEU %.1f chrF %.1f" % (result["bleu"], result["chrf"]))
        export(view, name, checkpoint(view, name))
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {name: pool.submit(student, name) for name in order}
        try:
            return {name: futures[name].result() for name in a.students}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # students not started yet never start; running ones finish
            raise


def main(argv=None):
    a = parse_args(argv, __doc__.split("\n\n")[0])
    try:  # before anything is written
        if a.data:
            check_user_corpus(a)
        record = check_plateau_teacher(a) if a.plateau_teacher else None
    except (build_corpus.CorpusError, PlateauTeacherError) as e:
        print("demo: error: %s" % e, file=sys.stderr)
        sys.exit(2)
    p = Pipeline(a)
    p.progress("demo", "work directory %s (%s mode, %s -> %s)" % (p.work, "QUICK" if a.quick else "full",
                                                                  a.src_lang, a.tgt_lang))
    try:
        if record:
            prepare_data(p)
            install_plateau_teacher(p, record)
        else:
            build_teacher(p)
        results = {"teacher": evaluate(p, "teacher")}
        p.progress("teacher", "BLEU %.1f chrF %.1f" % (results["teacher"]["bleu"], results["teacher"]["chrf"]))
        export(p, "teacher", checkpoint(p, "teacher"))
        if needs(a.students, "{distill}"):
            for split in ("train", "valid"):
                distill(p, split)
        if needs(a.students, "{cache}"):
            dump_cache(p)
        results.update(train_students(p))
        columns = inference_columns(p, list(results), checkpoint, lambda name: generate_cmd(p, name))
    except PlateauTeacherError as e:
        print("demo: error: %s" % e, file=sys.stderr)
        sys.exit(2)
    except (StepFailed, build_corpus.CorpusError) as e:
        sys.exit("demo: %s" % e)
    sha = teacher_sha256(p)
    for name, r in results.items():
        r.update(columns[name], teacher_sha256=sha)
    write_lines(p.path("results.json"), [json.dumps(results, indent=1)])  # every system, naming its teacher
    text = report(p, results, {s: student_args(p, s) for s in a.students}, generate_cmd(p, "SYSTEM"),
                  student_threads(a), {role: shape(a, role) for role in ("teacher", "student")})
    write_lines(p.path("results.md"), text.split("\n"))
    docs = not (a.quick or a.data or a.plateau_teacher)  # only the default full run is the repository's DEMO.md
    if docs:
        os.makedirs(os.path.join(REPO, "docs"), exist_ok=True)
        write_lines(os.path.join(REPO, "docs", "DEMO.md"), text.split("\n"))
    print("\n" + text)
    p.progress("demo", "finished; results in %s%s" % (p.path("results.md"), " and docs/DEMO.md" if docs else ""))
    if docs and results["teacher"]["bleu"] < 20:
        print("warning: the teacher reached only %.1f BLEU (expected >= 20)" % results["teacher"]["bleu"])
    if any(r["params"] >= results["teacher"]["params"] for name, r in results.items() if name != "teacher"):
        print("warning: the students are not smaller than the teacher (see --student-* and --teacher-*)")


if __name__ == "__main__":
    main()
