"""examples/compare_mix.py: multi-seed runs on a generated corpus (tiny models, a few updates), one record per run
with scores equal to sacreBLEU on its hypotheses, a resumed second run that trains nothing, and the paired
bootstrap against a direct computation."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from test_demo import TINY, write_tsv

sys.path.insert(0, os.path.join(REPO, "examples"))
import compare_mix  # noqa: E402

SCRIPT = os.path.join(REPO, "examples", "compare_mix.py")
CONFIGS, SEEDS = ["token-cache8", "mix-word"], [1, 2]


def compare(work, tsv, results, *extra):
    cmd = [sys.executable, SCRIPT, "--configs", ",".join(CONFIGS), "--seeds", "1,2", "--epochs", "1",
           "--results", results, "--work", work, "--data", tsv, "--train-pairs", "300", "--valid-pairs", "40",
           "--test-pairs", "40", "--bpe-size", "64", "--max-tokens", "200", "--max-update", "8", "--jobs", "2",
           *TINY, *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    tsv, work, results = str(tmp / "pairs.tsv"), str(tmp / "work"), str(tmp / "mix.json")
    write_tsv(tsv)
    first = compare(work, tsv, results, "--speed", "1")
    assert first.returncode == 0, first.stdout[-4000:]
    second = compare(work, tsv, results)
    assert second.returncode == 0, second.stdout[-4000:]
    with open(results) as f:
        return first.stdout, second.stdout, json.load(f), work


def test_one_record_per_run_with_scores_of_its_hypotheses(runs):
    from sacrebleu.metrics import BLEU, CHRF

    _, _, records, work = runs
    assert sorted((r["config"], r["seed"]) for r in records) == sorted((c, s) for c in CONFIGS for s in SEEDS)
    refs = compare_mix.read_lines(os.path.join(work, "corpus", "test.en"))
    for r in records:
        hyps = compare_mix.read_lines(os.path.join(REPO, r["hyps"]))
        assert r["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
        assert r["updates"] == 8 and r["epochs"] == 1 and r["train_seconds"] > 0
        assert r["valid"] and r["valid"][-1]["updates"] == 8 and r["valid"][-1]["ppl"] > 1
        assert ("--kd-mix" in r["flags"]) == (r["config"] == "mix-word")
    # different seeds are different runs
    a, b = (next(r for r in records if r["config"] == "token-cache8" and r["seed"] == s) for s in SEEDS)
    hyps_a, hyps_b = (compare_mix.read_lines(os.path.join(REPO, r["hyps"])) for r in (a, b))
    assert hyps_a != hyps_b or a["valid"] != b["valid"]


def test_second_run_trains_nothing_and_prints_the_same_table(runs):
    first, second, _, _ = runs
    assert "running" not in second
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert len(table) == 2 * (2 + len(CONFIGS))  # the scores, then the speed table
    assert table == [line for line in second.splitlines() if line.startswith("|")]
    assert "p = " in table[1 + len(CONFIGS)]  # mix-word tested against token-cache8


def test_paired_bootstrap_matches_the_corpus_difference():
    from sacrebleu.metrics import BLEU

    refs = ["the cat sat on the mat today", "a quick brown fox jumps over it", "hello world again and again"] * 30
    good = [refs, refs]
    bad = [[r.replace("cat", "dog").replace("fox", "cat") for r in refs]] * 2
    d, lo, hi, p = compare_mix.paired_bootstrap(good, bad, refs, resamples=300)
    direct = BLEU().corpus_score(refs * 2, [refs * 2]).score - BLEU().corpus_score(bad[0] * 2, [refs * 2]).score
    assert lo <= direct <= hi and abs(d - direct) < 2 and p == 0.0
    same = compare_mix.paired_bootstrap(good, good, refs, resamples=50)
    assert same[:3] == (0.0, 0.0, 0.0) and same[3] == 1.0


def test_speed_columns_are_measured_per_run(runs):
    """--speed 1: every run exported and timed once per path (the logs' numbers), the export's BLEU is
    sacreBLEU of its hypotheses, the printed speed table has one row per configuration; the second run
    (no --speed) keeps the fields and measures nothing again."""
    from sacrebleu.metrics import BLEU

    first, second, records, work = runs
    refs = compare_mix.read_lines(os.path.join(work, "corpus", "test.en"))
    with open(os.path.join(work, "speed-compare.json")) as f:
        timed = json.load(f)
    for r in records:
        name = compare_mix.run_name(r["config"], r["seed"], r["epochs"])
        assert r["fairseq_speed"] == timed[name]["fairseq"][0] > 0 and r["ct2_speed"] == timed[name]["ct2"][0] > 0
        log = open(os.path.join(work, "logs", "speed-%s-fairseq-r1.log" % name)).read()
        assert compare_mix.demo_speed.parse_generate_speed(log)[2] == r["fairseq_speed"]
        hyps = compare_mix.read_lines(os.path.join(work, "eval", "%s.ct2.hyp" % name))
        assert r["ct2_bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["ct2_mb"] > 0 and r["params"] > 0
    for out in (first, second):
        assert "| CTranslate2 int8 sent/s |" in out and sum(("| %s | " % c) in out.split("sent/s")[-1]
                                                             for c in CONFIGS) == len(CONFIGS)
