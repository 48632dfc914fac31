"""examples/compare_mix.py (its pieces: kdexp/mix.py): multi-seed runs on a generated corpus (tiny models, a few
updates), one record per run with scores equal to sacreBLEU on its hypotheses, the fairseq-train command its step
ran and the teacher checkpoint's sha256, a resumed second run that trains nothing, and the paired bootstrap
against a direct computation; every configuration (and benchmarks/bench_kd.py's) spells out its criterion's
flags; records of retired configurations stay reportable."""
import hashlib
import json
import os
import shlex
import subprocess
import sys

import pytest
from kdexp import configs, mix, speed
from kdexp.pipeline import EXAMPLES, read_lines, repo_relative

from driver_helpers import TINY, check_configs, criterion_flags, flag_values, flags_of, write_tsv
from helpers import REPO, driver_env

SCRIPT = os.path.join(REPO, "examples", "compare_mix.py")
CONFIGS, SEEDS = ["token-cache8", "hybrid-gate-cache8"], [1, 2]


def compare(work, tsv, results, *extra):
    cmd = [sys.executable, SCRIPT, "--configs", ",".join(CONFIGS), "--seeds", "1,2", "--epochs", "1",
           "--results", results, "--work", work, "--data", tsv, "--train-pairs", "300", "--valid-pairs", "40",
           "--test-pairs", "40", "--bpe-size", "64", "--max-tokens", "200", "--max-update", "8", "--jobs", "2",
           *TINY, *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=REPO,
                          env=driver_env())


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
    refs = read_lines(os.path.join(work, "corpus", "test.en"))
    with open(os.path.join(work, "ckpt", "teacher", "checkpoint_last.pt"), "rb") as f:
        teacher = hashlib.sha256(f.read()).hexdigest()
    for r in records:
        assert r["teacher_sha256"] == teacher  # the record names the teacher it distils
        hyps = read_lines(os.path.join(REPO, r["hyps"]))
        assert r["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
        assert r["updates"] == 8 and r["epochs"] == 1 and r["train_seconds"] > 0
        assert r["valid"] and r["valid"][-1]["updates"] == 8 and r["valid"][-1]["ppl"] > 1
        # the record's command is the one its step ran (the log's first line), its flags in one piece in it
        with open(os.path.join(work, "logs", "train-%s.log" % mix.run_name(r["config"], r["seed"], 1))) as f:
            ran = [repo_relative(x) for x in shlex.split(f.readline()[2:])]
        assert r["train_cmd"] == ran and ran[0].endswith("fairseq-train")
        n = len(r["flags"])
        assert any(ran[i:i + n] == r["flags"] for i in range(len(ran))), (r["flags"], ran)
        assert flag_values(ran)["--seed"] == str(r["seed"]) and flag_values(ran)["--max-epoch"] == "1"
        assert flag_values(r["flags"])["--kd-gate" if "hybrid" in r["config"] else "--kd-topk"] == \
            {"token-cache8": "8", "hybrid-gate-cache8": "sentence"}[r["config"]]
    # different seeds are different runs
    a, b = (next(r for r in records if r["config"] == "token-cache8" and r["seed"] == s) for s in SEEDS)
    hyps_a, hyps_b = (read_lines(os.path.join(REPO, r["hyps"])) for r in (a, b))
    assert hyps_a != hyps_b or a["valid"] != b["valid"]


def test_second_run_trains_nothing_and_prints_the_same_table(runs):
    first, second, _, _ = runs
    assert "running" not in second
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert len(table) == 2 * (2 + len(CONFIGS))  # the scores, then the speed table
    assert table == [line for line in second.splitlines() if line.startswith("|")]
    assert "p = " in table[1 + len(CONFIGS)]  # hybrid-gate-cache8 tested against token-cache8
    assert "paired-bootstrap diff (mean [95% CI], p)" in table[0]
    assert "not the difference of the BLEU means in the table" in first


def test_every_configuration_spells_out_its_criterion():
    """Each configuration gives every flag of its criterion's dataclass, none retired, and no two are the same;
    hybrid-gate (the learned gate its records ran as hybrid_kd's then default) and its cached twin say so."""
    check_configs(flags_of(configs.MIX))
    assert not set(configs.RETIRED) & set(configs.MIX)
    gates = {c: flag_values(f).get("--kd-gate") for c, f in flags_of(configs.MIX).items()}
    assert gates["hybrid-gate"] == gates["hybrid-gate-cache8"] == "sentence"
    assert gates["hybrid-even"] == gates["hybrid-even-cache8"] == gates["hybrid-even-cache8-ds"] == "fixed:0.5"
    assert "{cache_t}" not in " ".join(str(f) for flags in flags_of(configs.MIX).values() for f in flags)


def test_benchmark_configurations_spell_out_their_criterion():
    """benchmarks/bench_kd.py's configurations and loss probes (kdexp.configs.BENCH, PROBES); the probe run by
    the benchmark itself, as make bench runs it (PYTHONPATH=examples)."""
    check_configs({name: config.flags() for name, (_, config) in configs.BENCH.items()})
    expected = {f[2:].replace("-", "_") for f in criterion_flags("token_kd")}
    for name, (_, kw) in configs.PROBES.items():  # the loss probes build TokenKDCriterion from every field
        assert kw is None or set(kw) == expected, (name, sorted(expected ^ set(kw)))
    env = dict(os.environ, PYTHONPATH=EXAMPLES)
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_kd.py"), "--probe", "token-topk",
                        "--probe-tokens", "256", "--vocab", "100", "--topk", "8"], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env)
    assert p.returncode == 0 and float(p.stdout.split()[-1]) > 0, p.stderr[-2000:]  # the criterion takes them


def test_report_shows_retired_configurations_from_their_records(tmp_path):
    """A record whose configuration left CONFIGS is still reported (marked retired, its stored flags listed);
    training it is refused; missing hypotheses give n/a, not a crash."""
    def record(config, flags, seed):
        return {"config": config, "flags": flags, "seed": seed, "epochs": 3, "updates": 10, "bleu": 10.0 + seed,
                "chrf": 30.0, "train_seconds": 5.0, "valid": [{"updates": 10, "loss": 2, "nll_loss": 1, "ppl": 2.0}],
                "hyps": "work/absent/%s-%d.hyp" % (config, seed)}

    old = ["--criterion", "hybrid_kd", "--kd-mix", "word", "--kd-topk", "8"]
    records = [record("mix-word", old, s) for s in (1, 2)] + [record("token-cache8", ["--criterion", "token_kd"], s)
                                                             for s in (1, 2)]
    results = str(tmp_path / "mix.json")
    with open(results, "w") as f:
        json.dump(records, f)
    text = mix.report(records, ["token-cache8", "mix-word"], [1, 2], 3, "token-cache8", None)
    rows = [line for line in text.splitlines() if line.startswith("| mix-word")]
    assert rows == ["| mix-word (retired) | 2 | 11.50 ± 0.71 | 30.00 ± 0.00 | 2.00 ± 0.00 | 5 | n/a |"]
    assert "- mix-word (--kd-mix word): `%s`" % " ".join(old) in text
    # the command line: --report accepts a retired configuration that has records and prints that table;
    # training one is refused
    common = ["--seeds", "1,2", "--epochs", "3", "--results", results, "--work", str(tmp_path / "w")]
    shown = subprocess.run([sys.executable, SCRIPT, "--configs", "token-cache8,mix-word", "--report", *common],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0 and text in shown.stdout, shown.stderr[-2000:]
    refused = subprocess.run([sys.executable, SCRIPT, "--configs", "mix-word", *common], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
    assert refused.returncode == 2 and "mix-word retired: only --report shows their records" in refused.stderr


def test_paired_bootstrap_matches_the_corpus_difference():
    from sacrebleu.metrics import BLEU

    refs = ["the cat sat on the mat today", "a quick brown fox jumps over it", "hello world again and again"] * 30
    good = [refs, refs]
    bad = [[r.replace("cat", "dog").replace("fox", "cat") for r in refs]] * 2
    d, lo, hi, p = mix.paired_bootstrap(good, bad, refs, resamples=300)
    direct = BLEU().corpus_score(refs * 2, [refs * 2]).score - BLEU().corpus_score(bad[0] * 2, [refs * 2]).score
    assert lo <= direct <= hi and abs(d - direct) < 2 and p == 0.0
    same = mix.paired_bootstrap(good, good, refs, resamples=50)
    assert same[:3] == (0.0, 0.0, 0.0) and same[3] == 1.0


def test_speed_columns_are_measured_per_run(runs):
    """--speed 1: every run exported and timed once per path (the logs' numbers), the export's BLEU is
    sacreBLEU of its hypotheses, the printed speed table has one row per configuration; the second run
    (no --speed) keeps the fields and measures nothing again."""
    from sacrebleu.metrics import BLEU

    first, second, records, work = runs
    refs = read_lines(os.path.join(work, "corpus", "test.en"))
    with open(os.path.join(work, "speed-compare.json")) as f:
        timed = json.load(f)
    for r in records:
        name = mix.run_name(r["config"], r["seed"], r["epochs"])
        assert r["fairseq_speed"] == timed[name]["fairseq"][0] > 0 and r["ct2_speed"] == timed[name]["ct2"][0] > 0
        log = open(os.path.join(work, "logs", "speed-%s-fairseq-r1.log" % name)).read()
        assert speed.parse_generate_speed(log)[2] == r["fairseq_speed"]
        hyps = read_lines(os.path.join(work, "eval", "%s.ct2.hyp" % name))
        assert r["ct2_bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["ct2_mb"] > 0 and r["params"] > 0
    for out in (first, second):
        assert "| CTranslate2 int8 sent/s |" in out and sum(("| %s | " % c) in out.split("sent/s")[-1]
                                                             for c in CONFIGS) == len(CONFIGS)
