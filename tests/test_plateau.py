"""The plateau study's drivers end to end in their quick mode, on a generated corpus (examples/plateau_teacher.py,
examples/plateau.py; issue 28): the teacher's record and weights-only checkpoint, the batch-size measurement,
one record per finished run with every flag that defines it in its command, the per-epoch curve with its
compute, test BLEU whose sentence statistics reproduce it, the on-policy stage from token's best checkpoint,
no checkpoint left behind, a second run that trains nothing, and docs/PLATEAU.md's generator."""
import json
import os
import subprocess
import sys

import pytest
import torch
from kdexp import configs, plateau, plateau_report
from kdexp.pipeline import sha256

from helpers import REPO, driver_env
from test_demo import write_tsv

DATA = ["--train-pairs", "300", "--valid-pairs", "40", "--test-pairs", "40", "--bpe-size", "64"]
MAIN = ("plain", "token", "sentence", "hybrid")


def driver(name, work, tsv, *extra):
    cmd = [sys.executable, os.path.join(REPO, "examples", name), "--quick", "--work", work, "--data", tsv] + DATA
    out = subprocess.run(cmd + list(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=900, cwd=REPO, env=driver_env())
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plateau")
    tsv, work = str(tmp / "toy.tsv"), str(tmp / "work")
    write_tsv(tsv)
    driver("plateau_teacher.py", work, tsv, "--max-epoch", "2")
    only = ",".join(plateau.run_key(m, 1) for m in MAIN)
    driver("plateau.py", work, tsv, "--seeds", "1", "--only", only)
    with open(os.path.join(work, "plateau_results.json")) as f:
        records = json.load(f)
    return {"work": work, "tsv": tsv, "only": only, "records": records}


def record(study, method):
    found = [r for r in study["records"] if r["method"] == method]
    assert len(found) == 1, (method, [r["method"] for r in study["records"]])
    return found[0]


def test_teacher_is_weights_only_and_scored(study):
    teacher = os.path.join(study["work"], "teacher-quick.pt")
    state = torch.load(teacher, map_location="cpu", weights_only=False)
    assert state["last_optimizer_state"] is None and state["model"]
    with open(os.path.join(study["work"], "teacher.json")) as f:
        rec = json.load(f)
    assert rec["teacher_sha256"] == sha256(teacher) and 0 <= rec["test_bleu"] <= 100
    assert [c["epoch"] for c in rec["curve"]] == [1, 2]


def test_batch_size_measured_once_for_both_methods(study):
    rec = record(study, "batch")
    assert set(rec["runs"]) == {"batch-%s-%d" % (m, t) for m in ("plain", "token") for t in (1500, 4096)}
    assert all(r["wps"] > 0 and r["updates"] > 0 for r in rec["runs"].values())
    faster = all(rec["runs"]["batch-%s-4096" % m]["wps"] > rec["runs"]["batch-%s-1500" % m]["wps"]
                 for m in ("plain", "token"))
    no_worse = all(rec["runs"]["batch-%s-4096" % m]["valid_loss"] <= rec["runs"]["batch-%s-1500" % m]["valid_loss"]
                   for m in ("plain", "token"))
    assert rec["max_tokens"] == (4096 if faster and no_worse else 1500)


@pytest.mark.parametrize("method", MAIN)
def test_each_run_records_its_command_curve_and_scores(study, method):
    from sacrebleu.metrics import BLEU

    rec, batch = record(study, method), record(study, "batch")
    cmd = rec["command"]
    assert configs.missing_flags(cmd) == []  # every flag that defines the criterion is spelled out
    for flag, value in (("--max-tokens", str(batch["max_tokens"])), ("--patience", str(plateau.PATIENCE)),
                        ("--lr-scheduler", "cosine"), ("--seed", "1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert rec["teacher_sha256"] == sha256(os.path.join(study["work"], "teacher-quick.pt"))
    epochs = [c["epoch"] for c in rec["curve"]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    per_epoch = rec["curve"][0]["token_rows"]
    assert all(c["token_rows"] == c["epoch"] * per_epoch for c in rec["curve"])
    assert rec["decoding"]["beam5"]["bleu"] == rec["test_bleu"] and set(rec["decoding"]) == set(plateau.DECODINGS)
    assert len(rec["bleu_stats"]) == 40
    summed = [sum(col) for col in zip(*rec["bleu_stats"])]
    assert BLEU()._compute_score_from_stats(summed).score == pytest.approx(rec["test_bleu"], abs=1e-9)
    assert set(rec["fixed_epochs"]) <= {"2"} and all(0 <= b <= 100 for b in rec["fixed_epochs"].values())
    if method in ("plain", "token"):  # gold batches: epoch 2 ends before the budget (the toy teacher's long
        assert "2" in rec["fixed_epochs"]  # outputs give sentence and hybrid more batches per epoch)
    assert rec["best_epoch"] == max(rec["curve"], key=lambda c: c["valid_bleu"])["epoch"]


def test_compute_counts_the_hybrids_two_passes(study):
    rows = {m: record(study, m)["curve"][0]["token_rows"] for m in MAIN}
    assert rows["plain"] == rows["token"] > 0 and rows["sentence"] > 0
    assert rows["hybrid"] == rows["plain"] + rows["sentence"]


def test_on_policy_stage_follows_token(study):
    budget = int(record(study, "token")["command"][record(study, "token")["command"].index("--max-update") + 1])
    for arm in plateau.STAGES:
        rec = record(study, arm)
        assert rec["from"] == "token-s1" and rec["updates"] == budget // plateau.BUDGET_EPOCHS[True]
        cmd = rec["command"]
        assert cmd[cmd.index("--restore-file") + 1].endswith("token-s1-best.pt") and "--reset-optimizer" in cmd
        assert configs.missing_flags(cmd) == [] and set(rec["decoding"]) == set(plateau.DECODINGS)
    assert not os.path.exists(os.path.join(study["work"], "inflight", "token-s1-best.pt"))  # released


def test_no_checkpoint_is_left_and_a_second_run_trains_nothing(study):
    ckpt = os.path.join(study["work"], "ckpt")
    assert sorted(os.listdir(ckpt)) == ["teacher"]
    out = driver("plateau.py", study["work"], study["tsv"], "--seeds", "1", "--only", study["only"])
    assert "recorded" not in out
    with open(os.path.join(study["work"], "plateau_results.json")) as f:
        assert json.load(f) == study["records"]


def test_report_from_the_records(study, tmp_path):
    md, png = str(tmp_path / "PLATEAU.md"), str(tmp_path / "plateau.png")
    text = plateau_report.write(study["records"], md=md, png=png)
    assert os.path.getsize(png) > 0 and open(md).read() == text + "\n"
    for m in MAIN + tuple(plateau.STAGES):
        assert "| %s | 1 |" % m in text
    assert "## (a) Plateau" in text and "## (c) The on-policy stage" in text
    assert "Every run uses --max-tokens %d" % record(study, "batch")["max_tokens"] in text
