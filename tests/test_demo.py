"""examples/demo.py end to end on a generated French-English corpus with a few dirty pairs (QUICK-sized models
in full mode, a few updates): the table and its scores, the language pair in every path and in the report, the
cleaning counts, the repository's docs/DEMO.md left alone, the students trained two at a time (the cached ones
reading the top-8 teacher cache), the size and speed columns against the files and the speed phase's logs, the
CTranslate2 path's scores, a second run that reuses every step, the students run with the flags their
configurations spell out; and one-line errors for malformed TSVs and bad flags. The configurations themselves:
tests/test_configs.py; the speed phase's pure pieces: tests/test_demo_speed.py."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from kdexp import configs, corpus, pipeline
from kdexp.speed import parse_generate_speed

from driver_helpers import MIS_SPLIT, STUDENTS, TINY, toy_pairs, write_tsv
from helpers import REPO, driver_env

DEMO = os.path.join(REPO, "examples", "demo.py")
DEMO_MD = os.path.join(REPO, "docs", "DEMO.md")
UPDATES = 12
FR_EN = ["--src-lang", "fr", "--tgt-lang", "en"]


def demo(work, tsv, *extra, **kw):
    cmd = [sys.executable, DEMO, "--work", work, "--data", tsv, "--train-pairs", "300",
           "--valid-pairs", "40", "--test-pairs", "40", "--bpe-size", "64", "--max-tokens", "200",
           "--max-update", str(UPDATES), "--jobs", "2", "--speed-reps", "1", *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=kw.get("stderr", subprocess.STDOUT), text=True,
                          timeout=900, cwd=REPO, env=driver_env())


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The fr-en demo run twice in the same work directory: (first, second) CompletedProcess, work dir, TSV lines.
    docs/DEMO.md is restored (and the test fails) if a run wrote it."""
    tmp = tmp_path_factory.mktemp("demo")
    tsv, work = str(tmp / "pairs.tsv"), str(tmp / "work")
    lines = write_tsv(tsv, dirty=True)
    before = read(DEMO_MD) if os.path.exists(DEMO_MD) else None
    try:
        first = demo(work, tsv, *FR_EN, *TINY)
        assert first.returncode == 0, first.stdout[-4000:]
        second = demo(work, tsv, *FR_EN, *TINY)
        assert second.returncode == 0, second.stdout[-4000:]
    finally:
        after = read(DEMO_MD) if os.path.exists(DEMO_MD) else None
        if after != before and before is None:
            os.remove(DEMO_MD)
        elif after != before:
            with open(DEMO_MD, "w", encoding="utf-8") as f:
                f.write(before)
    assert after == before, "a --data run rewrote docs/DEMO.md"
    return first, second, work, lines


ROW = re.compile(r"^\| (teacher|student: [\w-]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| \d+ \| ([\d.]+) "
                 r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", re.M)


def full_table(output):
    """{system: {column: value}} from the printed markdown table."""
    keys = ("params", "ckpt_mb", "ct2_mb", "updates", "bleu", "chrf", "fairseq_speed", "ct2_speed", "ct2_bleu",
            "ct2_chrf")
    return {m[0].replace("student: ", ""): dict(zip(keys, [int(m[1].replace(",", ""))] + [float(x) for x in m[2:4]]
                                                    + [int(m[4])] + [float(x) for x in m[5:]]))
            for m in ROW.findall(output)}


def table(output):
    """{system: (params, updates, BLEU, chrF)} from the printed markdown table."""
    return {name: (r["params"], r["updates"], r["bleu"], r["chrf"]) for name, r in full_table(output).items()}


def intervals(output):
    """{step: (start, end)} of the steps this run executed, from the progress lines."""
    starts = {m.group(2): float(m.group(1))
              for m in re.finditer(r"^\[\s*([\d.]+)s\] (\S+)\s+running \.\.\.$", output, re.M)}
    ends = {m.group(2): float(m.group(1))
            for m in re.finditer(r"^\[\s*([\d.]+)s\] (\S+)\s+done in ", output, re.M)}
    assert starts.keys() == ends.keys(), (starts, ends)
    return {step: (starts[step], ends[step]) for step in starts}


def test_demo_prints_the_table_of_every_system(runs):
    first, _, work, _ = runs
    rows = table(first.stdout)
    assert list(rows) == ["teacher"] + list(STUDENTS)
    assert all(updates == UPDATES for _, updates, _, _ in rows.values())  # --max-update reached every run
    student_params = {rows[s][0] for s in STUDENTS}
    assert len(student_params) == 1 and student_params.pop() < rows["teacher"][0]
    with open(os.path.join(work, "results.md")) as f:
        assert table(f.read()) == rows
    assert "Teacher distillation of train+valid (kd-distill-corpus, CTranslate2 float32 engine, beam 2)" \
        in first.stdout


def test_scores_are_sacrebleu_of_the_decoded_test_set(runs):
    """Each BLEU/chrF printed = sacreBLEU recomputed here on fairseq-generate's H- lines (in sentence order)
    against the test references, which are pairs of the input TSV."""
    from sacrebleu.metrics import BLEU, CHRF

    first, _, work, lines = runs
    src, refs = (read(os.path.join(work, "corpus", "test." + lang)).splitlines() for lang in ("fr", "en"))
    assert len(refs) == 40 and set("%s\t%s" % pair for pair in zip(src, refs)) <= set(lines)
    for name, (_, _, bleu, chrf) in table(first.stdout).items():
        found = dict(re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", read(os.path.join(work, "logs", "eval-%s.log" % name)),
                                re.M))
        hyps = [found[str(i)] for i in range(len(refs))]
        assert read(os.path.join(work, "eval", "%s.hyp" % name)).splitlines() == hyps
        assert bleu == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=0.05)
        assert chrf == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=0.05) and chrf > 0


def test_size_and_speed_columns_are_measured(runs):
    """Per system: the sizes are those of the checkpoint and of the int8 export's files; fairseq-generate's
    speed is what its speed-phase log prints, CTranslate2's what its timing printed, over all 40 test sentences."""
    first, _, work, _ = runs
    rows = full_table(first.stdout)
    assert list(rows) == ["teacher"] + list(STUDENTS)
    for name, r in rows.items():
        ckpt, export = (os.path.join(work, d, name) for d in ("ckpt", "export"))
        assert r["ckpt_mb"] == pytest.approx(os.path.getsize(os.path.join(ckpt, "checkpoint_last.pt")) / 1e6,
                                             abs=0.0051)
        assert {"model.bin", "spm.model", "kd_export.json"} <= set(os.listdir(export))
        assert r["ct2_mb"] == pytest.approx(sum(os.path.getsize(os.path.join(export, f)) for f in os.listdir(export))
                                            / 1e6, abs=0.0051)
        log = read(os.path.join(work, "logs", "speed-%s-fairseq-r1.log" % name))
        cmd = log.splitlines()[0]
        assert os.path.realpath(cmd.split()[1]) == os.path.realpath(pipeline.tool("fairseq-generate"))
        assert "--beam 5 --batch-size 64" in cmd and cmd.endswith("--max-len-b 10 --cpu --num-workers 0")
        timed = dict(re.findall(r"^H-(\d+)\t[^\t]*\t(.*)$", log, re.M))  # the timed decode is the scored one
        assert [timed[str(i)] for i in range(40)] == read(os.path.join(work, "eval", "%s.hyp" % name)).splitlines()
        sentences, _, speed = parse_generate_speed(log)
        assert sentences == 40 and speed > 0 and r["fairseq_speed"] == pytest.approx(speed, abs=0.051)
        timing = json.loads(read(os.path.join(work, "logs", "speed-%s-ct2-r1.log" % name)).splitlines()[-1])
        assert timing["sentences"] == 40 and timing["seconds"] > 0
        assert r["ct2_speed"] == pytest.approx(timing["sentences_per_s"], abs=0.051)
    assert all(rows["teacher"][k] > rows[s][k] for s in STUDENTS for k in ("params", "ckpt_mb", "ct2_mb"))
    assert re.search(r"^- Sizes and speed .* one thread each .* beam 5, batches of 64 .* 1 repetition\(s\) "
                     r"interleaved round-robin", first.stdout, re.M)


def test_ct2_scores_are_sacrebleu_of_its_hypotheses(runs):
    """The CTranslate2 column's BLEU/chrF = sacreBLEU of the hypotheses it wrote (40, detokenized like
    fairseq-generate's: no sentencepiece marks) against the test references."""
    from sacrebleu.metrics import BLEU, CHRF

    first, _, work, _ = runs
    refs = read(os.path.join(work, "corpus", "test.en")).splitlines()
    for name, r in full_table(first.stdout).items():
        hyps = read(os.path.join(work, "eval", "%s.ct2.hyp" % name)).splitlines()
        assert len(hyps) == len(refs) == 40 and not any("\u2581" in h for h in hyps)
        assert r["ct2_bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=0.051)
        assert r["ct2_chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=0.051)
        assert r["ct2_chrf"] > 0


def test_language_pair_names_every_path_and_the_report(runs):
    first, _, work, _ = runs
    files = [os.path.relpath(os.path.join(d, f), work) for d, _, fs in os.walk(work) for f in fs]
    for split in ("train", "valid", "test"):
        assert {"corpus/%s.fr" % split, "bpe/%s.en" % split, "data-bin/%s.fr-en.fr.bin" % split} <= set(files)
    assert {"distill/train.fr-en.en.idx", "distill/valid.fr-en.en.idx"} <= set(files)
    assert not [f for f in files if re.search(r"\bde\b", f)], files
    report = read(os.path.join(work, "results.md"))
    assert report.startswith("# kd-plugin demo: fr -> en, `pairs.tsv`\n")
    assert "- Data: `%s` (fr -> en); train 300 / valid 40 / test 40 pairs" % os.path.join(os.path.dirname(work),
                                                                                         "pairs.tsv") in report
    assert "--source-lang fr --target-lang en --gen-subset test" in report
    assert not re.search(r"\bde\b|German|LibreOffice", first.stdout), first.stdout
    assert "results in %s\n" % os.path.join(work, "results.md") in first.stdout  # and not docs/DEMO.md


def test_dirty_pairs_are_cleaned_and_counted(runs):
    first, _, work, lines = runs
    expected = ("%s pairs read, 2,000 kept; dropped 6: 1 empty side, 1 over 250 tokens, 1 over 1500 characters, "
                "1 length ratio over 9, 1 untranslated (source == target), 1 duplicate pair"
                % "{:,}".format(len(lines)))
    assert "- Cleaning (examples/build_corpus.py, Moses clean-corpus-n style): %s\n" % expected \
        in read(os.path.join(work, "results.md"))
    assert expected in read(os.path.join(work, "logs", "corpus.log")) and expected in first.stdout
    corpus = [line for d in ("corpus", "corpus-full") for split in ("train", "valid", "test") for lang in ("fr", "en")
              for line in read(os.path.join(work, d, "%s.%s" % (split, lang))).splitlines()]
    assert max(map(len, corpus)) < 100 and "same words" not in corpus  # nothing dirty reached fairseq


def test_students_train_two_at_a_time_costliest_first(runs):
    first, _, _, _ = runs
    steps = intervals(first.stdout)
    student_steps = {"%s-%s" % (kind, s): steps["%s-%s" % (kind, s)] for s in STUDENTS
                     for kind in ("train", "eval", "export")}
    # students start only after distillation and the cache dump; each one's test decoding follows its own
    # training, its export its decoding; the speed phase follows everything
    assert steps["cache8-train"][0] >= steps["distill-valid"][1]
    assert min(start for start, _ in student_steps.values()) >= steps["cache8-valid"][1]
    assert all(steps["eval-" + s][0] >= steps["train-" + s][1] for s in STUDENTS)
    assert all(steps["export-" + s][0] >= steps["eval-" + s][1] for s in STUDENTS)
    assert steps["speed"][0] >= max(end for step, (_, end) in steps.items() if step != "speed")
    running = [sum(1 for start, end in student_steps.values() if start <= t < end)
               for t, _ in student_steps.values()]
    assert max(running) == 2
    order = sorted(STUDENTS, key=lambda s: steps["train-" + s][0])
    assert set(order[:2]) == {"token", "hybrid"}  # the students that read the cache start first
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert "students (training and test decoding) %d, 2 students at a time" % threads in first.stdout


def test_cached_students_read_the_top8_cache(runs):
    """token and hybrid train from WORK/cache8 (kd-dump-teacher --topk 8 of train and valid), never the online
    teacher; sentence reads the distilled targets; plain neither."""
    _, _, work, _ = runs

    def command(step):
        with open(os.path.join(work, "logs", step + ".log")) as f:
            return f.readline()[2:].split()

    for name in ("token", "hybrid"):
        cmd = command("train-" + name)
        assert cmd[cmd.index("--teacher-cache") + 1] == os.path.join(work, "cache8")
        assert cmd[cmd.index("--kd-topk") + 1] == "8" and "--teacher-path" not in cmd
    hybrid = command("train-hybrid")
    assert hybrid[hybrid.index("--kd-gate") + 1] == "fixed:0.5"  # spelled out, not hybrid_kd's default
    paths = {"user_dir": os.path.join(REPO, "kd_plugin"), "teacher": os.path.join(work, "ckpt", "teacher",
             "checkpoint_last.pt"), "distill": os.path.join(work, "distill"), "cache": os.path.join(work, "cache8")}
    for name in STUDENTS:  # each student ran exactly its STUDENTS flags, in one piece
        flags, cmd = [f.format(**paths) for f in configs.STUDENTS[name].flags()], command("train-" + name)
        assert any(cmd[i:i + len(flags)] == flags for i in range(len(cmd))), (name, cmd)
    for split in ("train", "valid"):
        dump = command("cache8-%s.0" % split)
        assert dump[dump.index("--topk") + 1] == "8" and dump[dump.index("--split") + 1] == split
        assert os.path.isfile(os.path.join(work, "cache8", "%s.topk.json" % split))
    assert "--teacher-targets" in command("train-sentence") and "--teacher-cache" not in command("train-sentence")
    assert not {"--teacher-cache", "--teacher-path", "--teacher-targets"} & set(command("train-plain"))


def test_second_run_reuses_every_step(runs):
    first, second, _, _ = runs
    assert "running ..." not in second.stdout and "made with other arguments" not in second.stdout
    reused = re.search(r"steps reused from earlier runs \(not in this time\): (.*)$", second.stdout, re.M)
    assert reused and set(reused.group(1).split(", ")) == set(intervals(first.stdout))
    assert table(second.stdout) == table(first.stdout)


def test_results_name_their_teacher(runs):
    """WORK/results.json: every system's scores, each naming the teacher checkpoint (its sha256), which the
    report's teacher line gives too."""
    _, _, work, _ = runs
    with open(os.path.join(work, "ckpt", "teacher", "checkpoint_last.pt"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(work, "results.json")) as f:
        results = json.load(f)
    assert list(results) == ["teacher"] + list(STUDENTS)
    assert {r["teacher_sha256"] for r in results.values()} == {sha}
    assert {name: r["updates"] for name, r in results.items()} == {name: UPDATES for name in results}
    assert "; checkpoint sha256 %s\n" % sha in read(os.path.join(work, "results.md"))


def test_cleaning_filters_and_their_limits(tmp_path):
    """Moses clean-corpus-n style: each filter drops just past its limit and keeps the limit itself."""
    words = lambda n, w="w": " ".join([w] * n)  # noqa: E731
    keep = [(words(250), words(250, "v")), ("a" * 1500, "b" * 1500), (words(9), "x"), ("x", words(9, "y")),
            ("  spaced   out ", "fine")]
    drop = {"empty": [("", "x"), ("x", "   ")], "tokens": [(words(251), words(251, "v")), (MIS_SPLIT, "short")],
            "chars": [("a" * 1501, "b")], "ratio": [(words(10), "x"), ("x y", words(19, "z"))],
            "untranslated": [("same", "same")], "duplicate": [("a" * 1500, "b" * 1500)]}
    pairs = keep + [pair for reason in drop for pair in drop[reason]]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join("%s\t%s\n" % pair for pair in pairs), encoding="utf-8")
    kept, record = corpus.load_tsv(str(tsv), ("fr", "en"))
    assert kept == [(" ".join(s.split()), " ".join(t.split())) for s, t in keep]
    assert record == {"read": len(pairs), "kept": len(keep), "dropped": {k: len(v) for k, v in drop.items()},
                      "limits": {"max_tokens": 250, "max_chars": 1500, "max_ratio": 9.0}}
    tighter = {"max_tokens": 100, "max_chars": 1000, "max_ratio": 5}
    _, dropped = corpus.clean(kept, **tighter)
    assert dropped == {"empty": 0, "tokens": 1, "chars": 1, "ratio": 2, "untranslated": 0, "duplicate": 0}


@pytest.mark.parametrize("content, message", [
    ("", ": empty file (expected one 'fr<TAB>en' pair per line)"),
    ("mot1\tword1\nno tab here\n", ":2: expected 'fr<TAB>en', got 1 field(s)"),
    ("mot1\tword1\tthird\n", ":1: expected 'fr<TAB>en', got 3 field(s)"),
    (b"mot1\tword1\n\xff\xfe\tx\n", ":2: not UTF-8 text"),
    ("\n".join(toy_pairs(1400)) + "\n", ": only 1400 pairs: need more than 1000 (test) + 500 (valid)"),
    ("\n".join(toy_pairs(2000)) + "\n", ": 2,000 pairs read, 2,000 kept; dropped 0; the split gives train 500 / "
                                        "valid 500 / test 1000 pairs, fewer than --train-pairs 600"),
], ids=["empty", "no-tab", "three-columns", "not-utf8", "too-few-pairs", "too-few-for-train-pairs"])
def test_malformed_tsv_is_one_line_naming_the_file(tmp_path, content, message):
    tsv, work = tmp_path / "pairs.tsv", str(tmp_path / "work")
    (tsv.write_bytes if isinstance(content, bytes) else tsv.write_text)(content)
    p = demo(work, str(tsv), *FR_EN, "--train-pairs", "600", stderr=subprocess.PIPE)
    assert p.returncode == 2 and p.stdout == "" and not os.path.exists(work)
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("demo: error: %s%s" % (tsv, message)), p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "--jobs must be >= 1 (got 0)"),
    (["--speed-reps", "0"], "--speed-reps must be >= 1 (got 0)"),
    (["--src-lang", "fr"], "--src-lang/--tgt-lang: the default corpus is de-en; pass --data FILE.tsv for fr-en"),
    (["--src-lang", "en"], "--src-lang and --tgt-lang are both 'en'"),
    (["--tgt-lang", "en.x"], "--tgt-lang: 'en.x' is not a language code (letters, digits, _)"),
    (["--clean-max-ratio", "0.5"], "--clean-max-ratio must be >= 1 (got 0.5)"),
])
def test_bad_flag_is_one_clear_error(tmp_path, flags, message):
    work = str(tmp_path / "work")
    cmd = [sys.executable, DEMO, "--work", work, *flags]
    if flags != ["--src-lang", "fr"]:
        cmd += ["--data", str(tmp_path / "absent.tsv")]  # flags are checked before the file
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == "demo.py: error: " + message, p.stderr
    assert not os.path.exists(work)


def test_too_big_bpe_vocabulary_is_one_clear_error(tmp_path):
    tsv = str(tmp_path / "pairs.tsv")
    write_tsv(tsv)
    p = demo(str(tmp_path / "work"), tsv, "--quick", "--bpe-size", "5000")  # de-en by default
    assert p.returncode == 1 and "Traceback" not in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: step bpe failed (--bpe-size 5000): Vocabulary size too high")
    assert os.path.isfile(str(tmp_path / "work" / "corpus" / "train.de"))
    assert not os.path.exists(str(tmp_path / "work" / "done" / "bpe.json"))
