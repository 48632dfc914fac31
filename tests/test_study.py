"""examples/study.py (its pieces: kdexp/study.py, study_levels.py, study_report.py): the --quick grid on a
generated corpus (tiny models, a few updates), run twice: one record per (cell, method, seed) whose scores are
sacreBLEU of its hypotheses, naming the teacher checkpoint by its sha256, the complexity levels and their measures
recomputed here from the BPE files, the sliced level data (binarized corpus, teacher targets, top-K cache)
equal to the full run's entries, a second run that trains nothing; one-line errors for bad flags; study_advise's
review before it writes the rule file."""
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from kdexp import configs, study_report
from kdexp.pipeline import repo_relative
from kdexp.study import run_name

from driver_helpers import TINY, check_configs, flag_values, write_tsv
from helpers import REPO, driver_env

SCRIPT = os.path.join(REPO, "examples", "study.py")
UPDATES = 8
METHODS = ("plain", "hybrid")  # hybrid reads both sliced teacher outputs (cache and decoded targets)
CELLS = ["centre", "complexity-low", "complexity-high", "size-l1-d16-f32-h2", "size-l1-d48-f96-h2",
         "decoding-greedy", "decoding-sample"]
LEVELS = ("low", "mid", "high")


def run_study(work, tsv, results, *extra):
    cmd = [sys.executable, SCRIPT, "--quick", "--results", results, "--work", work, "--data", tsv,
           "--src-lang", "fr", "--tgt-lang", "en", "--train-pairs", "300", "--valid-pairs", "60",
           "--test-pairs", "60", "--bpe-size", "64", "--max-tokens", "200", "--max-update", "12",
           "--updates", str(UPDATES), "--methods", ",".join(METHODS), "--distill-shards", "2", *TINY, *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, cwd=REPO,
                          env=driver_env())


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    tsv, work, results = str(tmp / "pairs.tsv"), str(tmp / "work"), str(tmp / "study.json")
    write_tsv(tsv)
    first = run_study(work, tsv, results, "--plot", str(tmp / "plots"))
    assert first.returncode == 0, first.stdout[-4000:]
    second = run_study(work, tsv, results)
    assert second.returncode == 0, second.stdout[-4000:]
    with open(results) as f:
        return first.stdout, second.stdout, json.load(f), work, tmp


def read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def test_one_record_per_cell_method_seed_scored_on_its_hypotheses(grid):
    from sacrebleu.metrics import BLEU, CHRF

    _, _, records, work, _ = grid
    assert sorted((r["cell"], r["method"], r["seed"]) for r in records) == \
        sorted((c, m, 1) for c in CELLS for m in METHODS)
    with open(os.path.join(work, "ckpt", "teacher", "checkpoint_last.pt"), "rb") as f:
        teacher = hashlib.sha256(f.read()).hexdigest()
    assert {r["teacher_sha256"] for r in records} == {teacher}
    for r in records:
        hyps, refs = read(os.path.join(REPO, r["hyps"])), read(os.path.join(REPO, r["refs"]))
        assert len(hyps) == len(refs) and r["complexity"] in r["refs"]
        assert r["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
        assert r["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
        assert r["updates"] == UPDATES and r["valid"][-1]["updates"] == UPDATES and r["train_seconds"] > 0
        assert ("hybrid_kd" in r["flags"]) == (r["method"] == "hybrid")
        # the record's command is the one its training step ran (the log's first line), its flags in one piece
        name = run_name(r["method"], r["size"], r["seed"], UPDATES)
        with open(os.path.join(work, "study", r["complexity"], "logs", "train-%s.log" % name)) as f:
            ran = [repo_relative(x) for x in shlex.split(f.readline()[2:])]
        assert r["train_cmd"] == ran and ran[0].endswith("fairseq-train")
        assert any(ran[i:i + len(r["flags"])] == r["flags"] for i in range(len(ran))), (r["flags"], ran)
        assert flag_values(ran)["--max-update"] == str(UPDATES) and flag_values(ran)["--seed"] == str(r["seed"])
    # the decoding cells decode the centre students again: same training, other hypotheses files
    centre = {r["method"]: r for r in records if r["cell"] == "centre"}
    for r in records:
        if r["cell"].startswith("decoding-"):
            assert r["valid"] == centre[r["method"]]["valid"] and r["hyps"] != centre[r["method"]]["hyps"]


def test_complexity_levels_and_measures_recomputed_from_the_bpe_files(grid):
    _, _, records, work, _ = grid
    bpe = {s: [line.split() for line in read(os.path.join(work, "bpe", "%s.fr" % s))] for s in ("train", "test")}
    s = sorted(len(x) for x in bpe["train"])
    t1, t2 = s[math.ceil(len(s) / 3) - 1], s[math.ceil(2 * len(s) / 3) - 1]
    counts = Counter(p for x in bpe["train"] for p in x)
    top = set(sorted(counts, key=lambda p: (-counts[p], p))[:64 // 4])
    means = {}
    for lv, (lo, hi) in zip(LEVELS, ((-1, t1), (t1, t2), (t2, 10 ** 9))):
        m = next(r for r in records if r["complexity"] == lv and r["method"] == "plain")["measures"]["complexity"]
        assert m["thresholds"] == [t1, t2] and m["rare_top"] == 16
        for split in ("train", "test"):
            chosen = [x for x in bpe[split] if lo < len(x) <= hi]
            pieces = [p for x in chosen for p in x]
            assert m[split]["pairs"] == len(chosen)
            assert m[split]["mean_len"] == pytest.approx(np.mean([len(x) for x in chosen]))
            assert m[split]["rare_rate"] == pytest.approx(sum(p not in top for p in pieces) / len(pieces))
            means[lv, split] = m[split]["mean_len"]
        # the level's test references are the chosen pairs' targets, in corpus order
        en = read(os.path.join(work, "corpus", "test.en"))
        assert read(os.path.join(work, "study", lv, "corpus", "test.en")) == \
            [e for e, x in zip(en, bpe["test"]) if lo < len(x) <= hi]
        hyps = read(os.path.join(work, "study", lv, "eval", "teacher-beam5.hyp"))
        from sacrebleu.metrics import BLEU

        refs = read(os.path.join(work, "study", lv, "corpus", "test.en"))
        assert m["teacher_bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    for split in ("train", "test"):  # the documented order: low < mid < high
        assert means["low", split] < means["mid", split] < means["high", split]
    params = {r["size"]: r["params"] for r in records if r["cell"].startswith("size-") or r["cell"] == "centre"}
    assert sorted(params.values()) == [params[s] for s in ("l1-d16-f32-h2", "l1-d32-f64-h2", "l1-d48-f96-h2")]


def test_level_data_are_the_full_runs_entries(grid):
    """Binarized sources, teacher-decoded targets and cached top-K rows of a level = the full run's, by id."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    _, _, _, work, _ = grid
    level = os.path.join(work, "study", "high")
    with open(os.path.join(level, "ids.json")) as f:
        ids = json.load(f)["train"]
    full_src = MMapIndexedDataset(os.path.join(work, "data-bin", "train.fr-en.fr"))
    sub_src = MMapIndexedDataset(os.path.join(level, "data-bin", "train.fr-en.fr"))
    full_t = MMapIndexedDataset(os.path.join(work, "distill", "train.fr-en.en"))
    sub_t = MMapIndexedDataset(os.path.join(level, "distill", "train.fr-en.en"))
    assert len(sub_src) == len(sub_t) == len(ids)
    full_off = np.fromfile(os.path.join(work, "cache8", "train.topk.idx"), dtype="<i8")
    sub_off = np.fromfile(os.path.join(level, "cache8", "train.topk.idx"), dtype="<i8")
    full_lp = np.fromfile(os.path.join(work, "cache8", "train.topk.lprobs.f16"), dtype="<f2").reshape(-1, 8)
    sub_lp = np.fromfile(os.path.join(level, "cache8", "train.topk.lprobs.f16"), dtype="<f2").reshape(-1, 8)
    for j, i in enumerate(ids):
        assert sub_src[j].tolist() == full_src[i].tolist() and sub_t[j].tolist() == full_t[i].tolist()
        assert np.array_equal(sub_lp[sub_off[j]:sub_off[j + 1]], full_lp[full_off[i]:full_off[i + 1]])
    with open(os.path.join(level, "cache8", "train.topk.json")) as f:
        assert json.load(f)["count"] == len(ids)


def test_second_run_trains_nothing_and_prints_the_tables_and_plots(grid):
    first, second, _, _, tmp = grid
    assert "running" not in second
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert table == [line for line in second.splitlines() if line.startswith("|")]
    assert any(line.startswith("| mid (centre) |") for line in table)
    assert sorted(os.listdir(tmp / "plots")) == ["study_complexity.png", "study_decoding.png", "study_size.png",
                                                 "study_valid.png"]
    curves = [line for line in table if line.startswith("| centre | plain |")]
    assert len(curves) == 1 and len(curves[0].split("|")) == 9  # the validation-curve row of the centre's plain


def test_study_advise_fits_the_rule_on_the_grids_cells(grid):
    """study_advise prints the fitted rule and its diff against --out, and writes --out only with --write (the
    review run on two of the cells, the written run on all of them: the diff it printed is the file written)."""
    from kd_plugin import advice
    from kd_plugin.cli.advise import describe_rule

    _, _, records, work, tmp = grid
    out = str(tmp / "rule.json")

    def advise(results, *extra):
        p = subprocess.run([sys.executable, os.path.join(REPO, "examples", "study_advise.py"), "--results", results,
                            "--work", work, "--methods", ",".join(METHODS), "--sample", "20", "--out", out, *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, cwd=REPO)
        assert p.returncode == 0, p.stdout[-3000:]
        return p.stdout

    two = str(tmp / "two-cells.json")
    with open(two, "w") as f:
        json.dump([r for r in records if r["cell"] in ("centre", "complexity-low")], f)
    review = advise(two)
    assert not os.path.exists(out)
    assert review.rstrip().endswith("not written (review the diff, then rerun with --write)")
    assert "+++ %s (fitted now)" % out in review and "Leave-one-cell-out: " in review
    written = advise(str(tmp / "study.json"), "--write")
    with open(out) as f:
        doc = json.load(f)
    diff = written[written.index("+++ "):written.index("written: %s" % out)].splitlines()[1:]
    assert [line[1:] for line in diff if line.startswith("+")] == json.dumps(doc, indent=1).splitlines()
    assert "Rule: %s" % describe_rule(doc["rule"]) in written
    assert sorted(c["cell"] for c in doc["cells"]) == sorted(CELLS)
    assert doc["rule"] == advice.fit_rule(doc["cells"], list(METHODS)) and doc["loo"]["cells"] == len(CELLS)
    for c in doc["cells"]:
        rs = {r["method"]: r for r in records if r["cell"] == c["cell"]}
        assert c["bleu"] == {m: rs[m]["bleu"] for m in METHODS}  # one seed: the mean is the run
        measures = rs["plain"]["measures"]
        # kd-advise's signals agree with the study's own measures of the cell
        assert c["signals"]["capacity_ratio"] == pytest.approx(measures["size"]["ratio"], rel=1e-6)
        assert c["signals"]["src_len"] == pytest.approx(measures["complexity"]["train"]["mean_len"])
        assert c["signals"]["decoding"] == {"beam5": 0, "greedy": 1, "sample": 2}[c["coords"]["decoding"]]
    assert "Leave-one-cell-out" in written


def test_every_method_spells_out_its_criterion():
    """plain, token, sentence and the default hybrid give every flag of their criterion's dataclass (none retired,
    no two the same); hybrid is g fixed at 1/2 over token's settings, the mix the study's records ran."""
    methods = configs.method_flags()
    assert sorted(methods) == sorted(configs.METHODS)
    check_configs(methods)
    hybrid, token = flag_values(methods["hybrid"]), flag_values(methods["token"])
    assert hybrid["--kd-gate"] == "fixed:0.5" and hybrid["--criterion"] == "hybrid_kd"
    assert {f: v for f, v in token.items() if f.startswith("--kd-")} == \
        {f: v for f, v in hybrid.items() if f.startswith("--kd-") and not f.startswith("--kd-gate")}


@pytest.mark.parametrize("flags, message", [
    (["--methods", "token,sentence"], "--methods: plain is needed"),
    (["--methods", "plain,word"], "--methods: 'plain,word'"),
    (["--sizes", "1:32:64:2,1:64:256:2"], "--sizes: an odd number"),
    (["--sizes", "1:30:64:4"], "--sizes: an odd number"),
    (["--decodings", "beam9"], "--decodings: 'beam9'"),
    (["--updates", "-1"], "--updates must be >= 0"),
    (["--seeds", "a"], "--seeds / --sizes: integers expected"),
    (["--student-dim", "x"], "argument --student-dim: invalid int value"),
    (["--hybrid", "--criterion hybrid_kd --kd-gate fixed:0.75 --teacher-cache {cache} --teacher-targets {distill}"],
     "--hybrid: give every flag of the criterion (missing --kd-alpha --kd-temperature"),
])
def test_bad_flags_one_line_exit_2(flags, message, tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, *flags, "--work", str(tmp_path / "w")], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    err = p.stderr
    assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("study: error: " + message), err
    assert p.stdout == "" and not os.path.exists(tmp_path / "w")


def test_bad_flag_from_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--jobs", "0", "--work", str(tmp_path / "w")], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and p.stderr == "study: error: --jobs must be >= 1 (got 0)\n"
    assert not os.path.exists(tmp_path / "w")


def test_significance_table_compares_the_right_hypotheses(tmp_path):
    from types import SimpleNamespace

    refs = ["the cat sat on the mat %d" % i for i in range(40)]
    files = {"refs": refs, "good": refs, "bad": ["a dog %d" % i for i in range(40)]}
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    runs = {"token": "good", "sentence": "bad", "hybrid": "bad", "plain": "bad"}
    records = [{"cell": "centre", "method": m, "seed": s, "updates": 1, "bleu": 100.0 if h == "good" else 1.0,
                "hyps": str(tmp_path / h), "refs": str(tmp_path / "refs")} for m, h in runs.items() for s in (1, 2)]
    args = SimpleNamespace(methods=list(runs), seeds=[1, 2], updates=1)
    table = study_report.significance(records, args, [("centre", {})], resamples=200).splitlines()
    assert table[0].count("paired-bootstrap diff (mean [95% CI], p)") == 2
    assert "not the difference of the BLEU means" in study_report.SIGNIFICANCE_CAPTION
    row = table[-1]
    token, hybrid = row.split("|")[2:4]
    assert token.strip().startswith("+") and "p = 0.000 (2 seeds)" in token  # token's hypotheses are the refs
    assert hybrid.strip().startswith("-") and "p = 1.000" in hybrid and "(vs token)" in hybrid
