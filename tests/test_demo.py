"""examples/demo.py end to end on a generated corpus (QUICK models, a few updates): the table, the students
trained two at a time, a second run that reuses every step, and a bad flag."""
import os
import random
import re
import subprocess
import sys

import pytest

from helpers import REPO

DEMO = os.path.join(REPO, "examples", "demo.py")
STUDENTS = ("plain", "token", "sentence", "hybrid")
UPDATES = 12


def write_tsv(path, n=2000, seed=0):
    """Toy de<TAB>en pairs: the English side maps wort<i> -> word<i>, word order kept; all pairs distinct."""
    rng = random.Random(seed)
    seen = {}  # insertion-ordered set
    while len(seen) < n:
        seen[tuple(rng.randrange(60) for _ in range(rng.randint(3, 9)))] = None
    with open(path, "w") as f:
        for words in seen:
            f.write("%s\t%s\n" % (" ".join("wort%d" % w for w in words), " ".join("word%d" % w for w in words)))


def demo(work, tsv, *extra):
    cmd = [sys.executable, DEMO, "--quick", "--work", work, "--data", tsv, "--train-pairs", "300",
           "--valid-pairs", "40", "--test-pairs", "40", "--bpe-size", "64", "--max-tokens", "200",
           "--max-update", str(UPDATES), "--jobs", "2", *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
                          cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo run twice in the same work directory: (first, second) CompletedProcess and the work dir."""
    tmp = tmp_path_factory.mktemp("demo")
    tsv, work = str(tmp / "pairs.tsv"), str(tmp / "work")
    write_tsv(tsv)
    first = demo(work, tsv)
    assert first.returncode == 0, first.stdout[-4000:]
    second = demo(work, tsv)
    assert second.returncode == 0, second.stdout[-4000:]
    return first, second, work


def table(output):
    """{system: (params, updates, BLEU, chrF)} from the printed markdown table."""
    rows = re.findall(r"^\| (teacher|student: [\w-]+) \| ([\d,]+) \| (\d+) \| \d+ \| ([\d.]+) \| ([\d.]+) \|$",
                      output, re.M)
    return {name.replace("student: ", ""): (int(params.replace(",", "")), int(updates), float(bleu), float(chrf))
            for name, params, updates, bleu, chrf in rows}


def intervals(output):
    """{step: (start, end)} of the steps this run executed, from the progress lines."""
    starts = {m.group(2): float(m.group(1))
              for m in re.finditer(r"^\[\s*([\d.]+)s\] (\S+)\s+running \.\.\.$", output, re.M)}
    ends = {m.group(2): float(m.group(1))
            for m in re.finditer(r"^\[\s*([\d.]+)s\] (\S+)\s+done in ", output, re.M)}
    assert starts.keys() == ends.keys(), (starts, ends)
    return {step: (starts[step], ends[step]) for step in starts}


def test_demo_prints_the_table_of_every_system(runs):
    first, _, work = runs
    rows = table(first.stdout)
    assert list(rows) == ["teacher"] + list(STUDENTS)
    assert all(updates == UPDATES for _, updates, _, _ in rows.values())  # --max-update reached every run
    student_params = {rows[s][0] for s in STUDENTS}
    assert len(student_params) == 1 and student_params.pop() < rows["teacher"][0]
    assert all(0 <= bleu <= 100 and 0 < chrf <= 100 for _, _, bleu, chrf in rows.values())
    with open(os.path.join(work, "results.md")) as f:
        assert table(f.read()) == rows
    assert "Teacher distillation of train+valid (kd-distill-corpus, beam 2)" in first.stdout


def test_students_train_two_at_a_time_online_teacher_first(runs):
    first, _, _ = runs
    steps = intervals(first.stdout)
    student_steps = {"%s-%s" % (kind, s): steps["%s-%s" % (kind, s)] for s in STUDENTS for kind in ("train", "eval")}
    # students start only after distillation, and each one's test decoding follows its own training
    assert min(start for start, _ in student_steps.values()) >= steps["distill-valid"][1]
    assert all(steps["eval-" + s][0] >= steps["train-" + s][1] for s in STUDENTS)
    running = [sum(1 for start, end in student_steps.values() if start <= t < end)
               for t, _ in student_steps.values()]
    assert max(running) == 2
    order = sorted(STUDENTS, key=lambda s: steps["train-" + s][0])
    assert set(order[:2]) == {"token", "hybrid"}  # the students that run the teacher start first
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert "students (training and test decoding) %d, 2 students at a time" % threads in first.stdout


def test_second_run_reuses_every_step(runs):
    first, second, _ = runs
    assert "running ..." not in second.stdout
    reused = re.search(r"steps reused from earlier runs \(not in this time\): (.*)$", second.stdout, re.M)
    assert reused and set(reused.group(1).split(", ")) == set(intervals(first.stdout))
    assert table(second.stdout) == table(first.stdout)


def test_too_big_bpe_vocabulary_is_one_clear_error(tmp_path):
    tsv = str(tmp_path / "pairs.tsv")
    write_tsv(tsv)
    p = demo(str(tmp_path / "work"), tsv, "--bpe-size", "5000")
    assert p.returncode == 1 and "Traceback" not in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: step bpe failed (--bpe-size 5000): Vocabulary size too high")
    assert not os.path.exists(str(tmp_path / "work" / "done" / "bpe.json"))


def test_bad_jobs_flag_is_one_clear_error(tmp_path):
    work = str(tmp_path / "work")
    p = demo(work, str(tmp_path / "absent.tsv"), "--jobs", "0")
    assert p.returncode == 2
    assert "--jobs must be >= 1 (got 0)" in p.stdout and "Traceback" not in p.stdout
    assert not os.path.exists(work)
