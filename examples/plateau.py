#!/usr/bin/env python3
"""The plateau study (issue 28): which KD gives the best small student, at what cost, with a converged teacher
and students trained to their plateau. Resumable by design: each finished run appends its record to
docs/plateau_results.json (with --commit, committed at once), and runs that have a record are skipped.

    .venv/bin/python examples/plateau_teacher.py        # first: the teacher (committed artifacts/plateau/teacher.pt)
    .venv/bin/python examples/plateau.py --commit       # the plan, two lanes of one thread, continuing where it stopped
    .venv/bin/python examples/plateau.py --snapshot     # before a stop: in-flight runs to artifacts/inflight (commit)
    .venv/bin/python examples/plateau.py --report       # docs/PLATEAU.md, plateau.png, kd_plugin/plateau_answer.json
    .venv/bin/python examples/plateau.py --quick        # smoke run (after plateau_teacher.py --quick): tiny everything

The plan, in order (kdexp/plateau.py defines every run):
1. the teacher's top-8 cache and beam-5 distilled corpus (CTranslate2 float32), rebuilt from the committed teacher;
2. batch size: plain and token_kd students at --max-tokens 1500 and 4096 for the same training time (each with
   the schedule it would train with), one run at a time on a quiet machine: words/s and validation loss; 4096 is
   used for every method only if it is faster for both and its validation loss is no worse (record "batch");
3. two lanes: the schedule pair (plain seed 1 with the calibration's inverse_sqrt schedule, to show that the
   study's cosine schedule loses nothing), then for seeds 1, 2, 3: plain, token, sentence, hybrid fixed:0.5
   (each token run was followed in its lane by the on-policy stage, on_policy_kd at share 1 and 0.5 and token_kd,
   one epoch from its best checkpoint: recorded for the three seeds, on_policy_kd then left the package); then,
   for seeds 1, 2, 3, hybrid-half (the hybrid over half the budget: equal student compute to plain and token at
   the end of an annealed schedule); last, the learned gate (hybrid-gate)
   for every seed (the issue asked for one; the paper's claim is the gate's, so it gets the seeds a paired
   bootstrap against the fixed weight needs).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import threading

from kdexp import plateau, plateau_answer, plateau_report, recipes
from kdexp.corpus import CorpusError
from kdexp.options import parse_args as demo_args
from kdexp.pipeline import REPO, Pipeline, StepFailed, sha256

BATCH_SECONDS = {False: 180, True: 15}
BATCH_TOKENS = (1500, 4096)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's --quick corpus, tiny models and budgets")
    parser.add_argument("--work", default=None, help="work directory (default work/plateau[-quick])")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds of the main runs")
    parser.add_argument("--lanes", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--only", default="", help="comma-separated run names to run (default: the whole plan)")
    parser.add_argument("--results", default=None, help="records file (default docs/plateau_results.json; "
                                                        "WORK/plateau_results.json with --quick)")
    parser.add_argument("--commit", action="store_true", help="git commit each record as soon as it is written")
    parser.add_argument("--snapshot", action="store_true", help="copy the in-flight runs to artifacts/inflight")
    parser.add_argument("--report", action="store_true",
                        help="write docs/PLATEAU.md, its plot and kd-advise's answer, run nothing")
    a, a.data_flags = parser.parse_known_args(argv)  # the rest: the demo's data flags (--data, sizes)
    if a.lanes < 1:
        parser.error("--lanes must be >= 1 (got %d)" % a.lanes)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        parser.error("--seeds: comma-separated integers (got %r)" % a.seeds)
    a.work = a.work or os.path.join(REPO, "work", "plateau-quick" if a.quick else "plateau")
    a.results = a.results or (os.path.join(a.work, "plateau_results.json") if a.quick else plateau.RESULTS)
    return a


class Records:
    """The records file, appended to by the lanes one record at a time, docs/PLATEAU.md, its plot and kd-advise's
    answer regenerated from the records so far (``report``; None for --quick); with --commit all committed at
    once."""

    def __init__(self, path, commit, report=None):
        self.path, self.commit, self.report, self.lock = path, commit, report, threading.Lock()

    def has(self, method, seed):
        return plateau.recorded(plateau.load_records(self.path), method, seed)

    def get(self, method, seed):
        return next((r for r in plateau.load_records(self.path) if r["method"] == method and r["seed"] == seed), None)

    def add(self, record, extra_paths=()):
        with self.lock:
            records = plateau.load_records(self.path) + [record]
            plateau.save_records(records, self.path)
            if self.report:
                self.report(records)
            if self.commit:  # extra paths: present ones, and tracked ones the run removed (its in-flight copy)
                files = [self.path] + [f for f in extra_paths if os.path.exists(f) or subprocess.call(
                    ["git", "ls-files", "--error-unmatch", f], cwd=REPO, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL) == 0]
                files += [plateau_report.MD, plateau_report.PNG, plateau_answer.JSON] if self.report else []
                subprocess.call(["git", "add", "-A", "--"] + files, cwd=REPO)
                subprocess.call(["git", "commit", "-q", "-m", "plateau (issue 28): the record of %s seed %d"
                                 % (record["method"], record["seed"]), "--"] + files, cwd=REPO)
        print("[plateau] recorded %s seed %d: test BLEU %s" % (record["method"], record["seed"],
                                                               record.get("test_bleu", "-")), flush=True)


def setup(a):
    """The data, the teacher (copied from its committed weights where the recipes read it), its cache and its
    distilled corpus; returns the pipeline."""
    d = demo_args(["--work", a.work, "--threads", "1", "--distill-beam", "5"] + (["--quick"] if a.quick else [])
                  + a.data_flags)
    p = Pipeline(d)
    recipes.prepare_data(p)
    teacher = plateau.teacher_pt(p)
    if not os.path.isfile(teacher):
        raise StepFailed("no plateau teacher at %s: run examples/plateau_teacher.py%s first"
                         % (os.path.relpath(teacher, REPO), " --quick" if a.quick else ""))
    there = recipes.checkpoint(p, "teacher")
    if not os.path.isfile(there) or sha256(there) != sha256(teacher):
        os.makedirs(os.path.dirname(there), exist_ok=True)
        shutil.copy(teacher, there)
        for step in ("distill-train", "distill-valid", "cache8-train", "cache8-valid"):  # made by another teacher
            if os.path.isfile(p.path("done", step + ".json")):
                os.remove(p.path("done", step + ".json"))
    for split in ("train", "valid"):
        recipes.distill(p, split)
    recipes.dump_cache(p)
    return p


def batch_size(p, a, records):
    """Step 2: the batch-size measurement (one run at a time); returns the --max-tokens of every run."""
    found = records.get("batch", 0)
    if found is None:
        runs = {}
        for method in ("plain", "token"):
            for tokens in BATCH_TOKENS:
                key = "batch-%s-%d" % (method, tokens)
                shutil.rmtree(p.path("ckpt", key), ignore_errors=True)
                budget = plateau.BUDGET_EPOCHS[a.quick] * plateau.updates_per_epoch(p.path("data-bin"), tokens)
                stop = plateau.optimization(tokens) + ["--max-update", str(budget), "--max-epoch", "0",
                                                       "--stop-time-hours", "%.6f" % (BATCH_SECONDS[a.quick] / 3600.0)]
                cmd = plateau.train_cmd(p, key, plateau.METHODS[method], 1, tokens, stop, extra=["--no-save"])
                plateau.train(p, key, cmd)
                runs[key] = dict(speed(p.path("logs", "train-%s.log" % key)), command=plateau.relative(cmd))
                shutil.rmtree(p.path("ckpt", key), ignore_errors=True)
        faster = all(runs["batch-%s-4096" % m]["wps"] > runs["batch-%s-1500" % m]["wps"] for m in ("plain", "token"))
        no_worse = all(runs["batch-%s-4096" % m]["valid_loss"] <= runs["batch-%s-1500" % m]["valid_loss"]
                       for m in ("plain", "token"))
        found = {"method": "batch", "seed": 0, "runs": runs, "seconds_each": BATCH_SECONDS[a.quick],
                 "teacher_sha256": sha256(plateau.teacher_pt(p)),
                 "max_tokens": 4096 if faster and no_worse else 1500,
                 "rule": "4096 if its words/s is higher for plain and token and its validation loss after the same "
                         "training time is no higher, else 1500"}
        records.add(found)
    return found["max_tokens"]


def speed(log):
    """Words/s (fairseq's summary of the epoch it stopped in) and the validation loss at its end, from a
    fairseq-train log."""
    text = open(log, errors="replace").read()
    wps = [float(x) for x in re.findall(r"\| train \| .*?\| wps ([\d.]+)", text)]
    valid = re.findall(r"valid on 'valid' subset .*?\| loss ([\d.]+)", text)
    updates = re.findall(r"num_updates[ =](\d+)", text)
    return {"wps": wps[-1] if wps else 0.0, "valid_loss": float(valid[-1]) if valid else float("inf"),
            "updates": int(updates[-1]) if updates else 0}


def plan(a):
    """[(name, method, seed)] in the order the lanes take them."""
    out = [("schedule-inverse_sqrt-s1", "plain", 1)]
    for seed in a.seeds:
        out += [(plateau.run_key(m, seed), m, seed) for m in ("plain", "token", "sentence", "hybrid")]
    out += [(plateau.run_key("hybrid-half", seed), "hybrid-half", seed) for seed in a.seeds]
    out += [(plateau.run_key("hybrid-gate", seed), "hybrid-gate", seed) for seed in a.seeds]
    only = set(x for x in a.only.split(",") if x)
    return [job for job in out if not only or job[0] in only]


def run_job(p, a, records, job, max_tokens, rows, budget):
    name, method, seed = job
    schedule = "inverse_sqrt" if name.startswith("schedule-") else "cosine"
    if not records.has(name.rsplit("-s", 1)[0], seed):
        record = plateau.student_run(p, method, seed, budget, max_tokens, rows, schedule)
        records.add(record, [plateau.inflight(p, name)])  # its in-flight copy was removed at its end


def main(argv=None):
    a = parse_args(argv)
    if a.report:
        return plateau_report.write(plateau.load_records(a.results))
    try:
        p = setup(a)
        if a.snapshot:
            for key in sorted(os.listdir(p.path("ckpt"))):
                if key != "teacher" and os.path.isfile(p.path("ckpt", key, "checkpoint_last.pt")):
                    print("snapshot: %s" % plateau.snapshot(p, key))
            return
        records = Records(a.results, a.commit, None if a.quick else plateau_report.write)
        max_tokens = batch_size(p, a, records)
        if not records.has("scenario", 0):
            records.add(plateau.scenario(p))
        rows = plateau.token_rows(p)
        budget = plateau.BUDGET_EPOCHS[a.quick] * plateau.updates_per_epoch(p.path("data-bin"), max_tokens)
        jobs, lock, errors = plan(a), threading.Lock(), []
        for config in plateau.METHODS.values():
            config.flags()  # imports kd_plugin (and registers its criteria) here, not in two lanes at once

        def lane():
            while True:
                with lock:
                    if not jobs or errors:
                        return
                    job = jobs.pop(0)
                try:
                    run_job(p, a, records, job, max_tokens, rows, budget)
                except (StepFailed, CorpusError) as e:
                    errors.append(str(e))

        threads = [threading.Thread(target=lane) for _ in range(a.lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise StepFailed(errors[0])
    except (StepFailed, CorpusError) as e:
        sys.exit("plateau: %s" % e)
    if not a.quick:
        plateau_report.write(plateau.load_records(a.results))


if __name__ == "__main__":
    main()
