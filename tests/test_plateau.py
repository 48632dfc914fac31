"""The plateau study's drivers end to end in their quick mode, on a generated corpus (examples/plateau_teacher.py,
examples/plateau.py; issue 28): the teacher's record and weights-only checkpoint, the batch-size measurement,
one record per finished run with every flag that defines it in its command, the per-epoch curve with its
compute, test BLEU whose sentence statistics reproduce it, no checkpoint left behind, a second run that trains nothing, and docs/PLATEAU.md's generator."""
import json
import os
import subprocess
import sys

import pytest
import torch
from kdexp import configs, plateau, plateau_report
from kdexp.pipeline import sha256

from driver_helpers import write_tsv
from helpers import REPO, driver_env

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
    records = plateau.load_records(os.path.join(work, "plateau_results.json"))
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
    for stats, score in ((rec["bleu_stats"], rec["test_bleu"]),
                         *((rec["decoding"][d]["bleu_stats"], rec["decoding"][d]["bleu"]) for d in ("greedy", "sampling"))):
        summed = [sum(col) for col in zip(*stats)]
        assert len(stats) == 40 and BLEU()._compute_score_from_stats(summed).score == pytest.approx(score, abs=1e-9)
    assert set(rec["fixed_epochs"]) <= {"2"} and all(0 <= b <= 100 for b in rec["fixed_epochs"].values())
    if method in ("plain", "token"):  # gold batches: epoch 2 ends before the budget (the toy teacher's long
        assert "2" in rec["fixed_epochs"]  # outputs give sentence and hybrid more batches per epoch)
    assert rec["best_epoch"] == max(rec["curve"], key=lambda c: c["valid_bleu"])["epoch"]


def test_compute_counts_the_hybrids_two_passes(study):
    rows = {m: record(study, m)["curve"][0]["token_rows"] for m in MAIN}
    assert rows["plain"] == rows["token"] > 0 and rows["sentence"] > 0
    assert rows["hybrid"] == rows["plain"] + rows["sentence"]


def test_no_checkpoint_is_left_and_a_second_run_trains_nothing(study):
    ckpt = os.path.join(study["work"], "ckpt")
    assert sorted(os.listdir(ckpt)) == ["teacher"]
    out = driver("plateau.py", study["work"], study["tsv"], "--seeds", "1", "--only", study["only"])
    assert "recorded" not in out
    assert plateau.load_records(os.path.join(study["work"], "plateau_results.json")) == study["records"]


def test_report_from_the_records(study, tmp_path):
    md, png = str(tmp_path / "PLATEAU.md"), str(tmp_path / "plateau.png")
    text = plateau_report.write(study["records"], md=md, png=png)
    assert os.path.getsize(png) > 0 and open(md).read() == text + "\n"
    for m in MAIN:
        assert "| %s | 1 |" % m in text
    assert "## (a) Plateau" in text and "## (c) The on-policy stage" not in text  # no stage runs any more
    assert "Every run uses --max-tokens %d" % record(study, "batch")["max_tokens"] in text


def test_schedule_pair_section_from_the_committed_records(tmp_path):
    """The schedule pair (plain seed 1: cosine vs inverse_sqrt), from the committed records: each run's stopping
    reason (inverse_sqrt: patience when it ended before its --max-epoch cap), compute to its best epoch, and the
    paired bootstrap of their test sentences."""
    from kdexp.mix import bootstrap_stats

    records = plateau.load_records()
    pair = [next(r for r in records if r["method"] == m and r["seed"] == 1) for m in ("plain", "schedule-inverse_sqrt")]
    text = plateau_report.write(records, md=str(tmp_path / "P.md"), png=str(tmp_path / "p.png"))
    rows = [next(c for c in r["curve"] if c["epoch"] == r["best_epoch"])["token_rows"] for r in pair]
    cmd = pair[1]["command"]
    stopped = "patience" if len(pair[1]["curve"]) < int(cmd[cmd.index("--max-epoch") + 1]) else "cap"
    assert pair[1]["stopped"] == stopped  # the record's own reason (kdexp.plateau.stop_reason)
    assert "| 1 | inverse_sqrt | %s | %d | %d | %s |" % (stopped, len(pair[1]["curve"]), pair[1]["best_epoch"],
                                                         "{:,}".format(rows[1])) in text
    assert "| 1 | cosine | cap | %d | %d | %s |" % (len(pair[0]["curve"]), pair[0]["best_epoch"],
                                                   "{:,}".format(rows[0])) in text
    d, lo, hi, p = bootstrap_stats([pair[0]["bleu_stats"]], [pair[1]["bleu_stats"]])
    assert ("Seed 1: cosine reaches its best with %.2fx inverse_sqrt's token-rows to its best; test BLEU, cosine "
            "minus inverse_sqrt (paired bootstrap): %+.2f [%+.2f, %+.2f], p = %.3f" % (rows[0] / rows[1], d, lo, hi, p)
            ) in text


def test_demo_report_states_its_distance_to_the_plateau():
    """The default full demo is comparable with the committed plateau teacher (same corpus and architecture) and
    the plateau students (plateau.arch); its report line puts each system beside its plateau, averaging the
    recorded seeds, and says why a quick, --data or other-architecture run is not comparable."""
    from kdexp import plateau_gap
    from kdexp.options import parse_args as demo_args

    a = demo_args([])
    teacher = next(r for r in plateau.load_records() if r["method"] == "teacher")  # the committed record
    student, other = plateau.arch(False), plateau.arch(True)
    records = [teacher] + [{"method": "plain", "seed": s, "command": student, "test_bleu": b, "best_epoch": e}
                           for s, b, e in ((2, 31.5, 38), (1, 30.5, 30))] + [
        {"method": "hybrid", "seed": 1, "command": other, "test_bleu": 33.0, "best_epoch": 20}]
    results = {"teacher": {"bleu": 24.24}, "plain": {"bleu": 19.04}, "hybrid": {"bleu": 18.0}}
    line = plateau_gap.plateau_line(a, results, records)
    assert line.startswith("- Distance to the plateau (docs/PLATEAU.md: ")
    assert ("teacher 24.2 BLEU here (%s epochs) vs %.1f at its plateau (best epoch %d of %d)"
            % (a.teacher_epochs, teacher["test_bleu"], teacher["best_epoch"], teacher["epochs"])) in line
    assert "; plain 19.0 here vs 31.0 at its plateau (2 seeds; best epochs 30/38)" in line
    assert "; hybrid 18.0 here, no plateau run yet" in line  # its record has another student architecture
    assert line.endswith("(students here: %s epochs)" % a.student_epochs)
    for argv, why in (([], "a QUICK smoke run"), (["--data", "pairs.tsv"], "another corpus (--data)"),
                      (["--bpe-size", "8000"], "other data sizes: --bpe-size"),
                      (["--teacher-dim", "256"], "another teacher architecture than the plateau teacher's")):
        b = demo_args(argv + (["--quick"] if why.startswith("a QUICK") else []))
        assert plateau_gap.plateau_line(b, results, records).endswith("not comparable (%s)" % why)


def test_demo_distils_the_plateau_teacher_when_asked(study, tmp_path):
    """demo --plateau-teacher RECORD: nothing trains the teacher; the run's teacher is the recorded checkpoint
    (its sha256), decodes the test set to the recorded BLEU, and the report says so. A teacher architecture or a
    dictionary other than the record's stops the run: one line naming the flag, exit status 2, no teacher."""
    path = os.path.join(study["work"], "teacher.json")
    with open(path) as f:
        rec = json.load(f)
    base = [sys.executable, os.path.join(REPO, "examples", "demo.py"), "--quick", "--data", study["tsv"]] + DATA + [
        "--plateau-teacher", path, "--students", "plain", "--threads", "1"]
    quick_teacher = ["--teacher-dim", "32", "--teacher-ffn", "64"]  # plateau_teacher.py --quick's shape

    def demo(work, *extra):
        return subprocess.run(base + ["--work", work] + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=900, cwd=REPO, env=driver_env())

    out = demo(str(tmp_path / "arch"))  # the demo's quick teacher shape (d=64), not the record's
    assert out.returncode == 2 and out.stderr.startswith("demo: error: --plateau-teacher: its architecture ") \
        and out.stderr.count("\n") == 1, out.stderr
    assert not os.path.exists(tmp_path / "arch")
    out = demo(str(tmp_path / "dict"), "--bpe-size", "80", *quick_teacher)  # another BPE: another dictionary
    assert out.returncode == 2 and "is not the dictionary the teacher was trained with" in out.stderr \
        and out.stderr.count("\n") == 1, out.stderr
    assert not os.path.exists(tmp_path / "dict" / "ckpt" / "teacher")

    work = str(tmp_path / "demo")
    out = demo(work, *quick_teacher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sha256(os.path.join(work, "ckpt", "teacher", "checkpoint_last.pt")) == rec["teacher_sha256"]
    with open(os.path.join(work, "logs", "train-teacher.log")) as f:
        assert "fairseq-train" not in f.read()  # the step installed it, nothing trained it
    with open(os.path.join(work, "results.json")) as f:
        results = json.load(f)
    assert results["teacher"]["bleu"] == pytest.approx(rec["test_bleu"], abs=1e-9)  # its decoding, its test set
    best = next(c for c in rec["curve"] if c["epoch"] == rec["best_epoch"])
    assert results["teacher"]["updates"] == best["updates"]
    with open(os.path.join(work, "results.md")) as f:
        report = f.read()
    assert "the plateau teacher of `%s` (--plateau-teacher: trained to convergence" % os.path.relpath(path, REPO) \
        in report
    assert "- Distance to the plateau (docs/PLATEAU.md: the same corpus and architectures trained to " \
           "convergence): not comparable (a QUICK smoke run)\n" in report


def synthetic_records(seeds, bleu, curves, half=None, gate=None):
    """Records of the four methods (and hybrid-half when ``half``, hybrid-gate when ``gate``): per method a test
    BLEU per seed (and greedy and sampling BLEU from it), a validation curve [(token_rows, valid_bleu)] per
    epoch, random per-sentence BLEU statistics scaled by the BLEU."""
    import numpy as np

    rng = np.random.RandomState(0)

    def stats(b):
        n = 40
        hyp = rng.randint(8, 12, n)
        correct = [np.minimum(hyp - k, np.round(hyp * b / 100 * (1 - 0.1 * k))).astype(int) for k in range(4)]
        return [[int(hyp[i]), int(hyp[i])] + [int(c[i]) for c in correct] + [int(hyp[i] - k) for k in range(4)]
                for i in range(n)]

    out = []
    for m in list(MAIN) + (["hybrid-half"] if half else []) + (["hybrid-gate"] if gate else []):
        for s in seeds:
            curve = [{"epoch": e + 1, "token_rows": rows, "valid_bleu": v + 0.1 * s, "wall": 10.0 * (e + 1)}
                     for e, (rows, v) in enumerate(curves[m])]
            best = max(curve, key=lambda c: c["valid_bleu"])["epoch"]
            test = bleu[m] + 0.2 * s  # greedy 2 BLEU lower; sampling 12 lower, but sentence's only 5
            decoding = {"beam5": test, "greedy": test - 2, "sampling": test - (5 if m == "sentence" else 12)}
            out.append({"method": m, "seed": s, "test_bleu": test, "bleu_stats": stats(bleu[m]), "curve": curve,
                        "best_epoch": best, "decoding": {d: {"bleu": b} for d, b in decoding.items()}})
            for d in ("greedy", "sampling"):  # sentences as good as the decoding's BLEU
                out[-1]["decoding"][d]["bleu_stats"] = stats(decoding[d] - 0.2 * s)
    return out


def test_answer_reads_the_best_final_student_and_the_budget_picks():
    """kdexp.plateau_answer: the best final student is the method with the highest mean test BLEU; the tight
    budget pick at f is the best validation BLEU of a checkpoint saved within f x plain's token-rows to its
    best (a run that ended sooner: its best); provisional below 3 seeds; the equal-compute line once
    hybrid-half has runs."""
    from kdexp import plateau_answer

    curves = {"plain": [(100, 10), (200, 20), (300, 30), (400, 29)],   # best at 300 rows: the unit
              "token": [(100, 12), (200, 21), (300, 31), (400, 32)],
              "sentence": [(100, 25), (150, 28)],                       # ended sooner: its best counts later
              "hybrid": [(200, 15), (400, 25), (600, 33), (800, 34)],
              "hybrid-half": [(200, 18), (400, 30)]}
    bleu = {"plain": 30, "token": 31, "sentence": 29, "hybrid": 34, "hybrid-half": 31.5}
    assert plateau_answer.best_within([{"token_rows": r, "valid_bleu": v} for r, v in curves["sentence"]], 50) is None
    a = plateau_answer.answer(synthetic_records([1, 2], bleu, curves))
    assert a["unit_token_rows"] == 300 and not a["complete"] and a["seeds"] == {m: 2 for m in MAIN}
    assert a["final"]["method"] == "hybrid" and a["final"]["runner_up"] == "token"
    assert a["final"]["compute_vs_plain"] == pytest.approx(800 / 300)
    assert a["final"]["test_bleu"]["mean"] == pytest.approx(34.3) and a["final"]["vs_runner_up"]["seeds"] == [1, 2]
    assert a["final"]["plain_bleu"]["mean"] == pytest.approx(30.3) and a["final"]["vs_plain"]["seeds"] == [1, 2]
    assert a["final"]["vs_plain"]["lo"] > a["final"]["vs_runner_up"]["lo"] > 0  # 34 vs 30 is wider than 34 vs 31
    # within 75 rows: nothing saved yet; 150: sentence 28.15; 300: sentence's best 28.15 < token 31.15
    picks = {b["fraction"]: (b["method"], round(b["value"]["mean"], 2)) for b in a["budget"]}
    assert picks == {0.5: ("sentence", 28.15), 1.0: ("token", 31.15)}
    one = next(b for b in a["budget"] if b["fraction"] == 1.0)  # token 31.1/31.2 vs plain 30.1/30.2: apart
    assert one["runner_up"] == "plain" and one["within_spread"] is False
    assert "equal_compute" not in a
    assert {d: (b["method"], b["runner_up"]) for d, b in a["by_decoding"].items()} == {
        "beam5": ("hybrid", "token"), "greedy": ("hybrid", "token"), "sampling": ("sentence", "hybrid")}
    # each decoding's best against its next: the paired bootstrap of that decoding's sentences (sampling: sentence's
    # 24 BLEU against the hybrid's 22, greedy: the hybrid's 32 against token's 29)
    sampling, greedy = a["by_decoding"]["sampling"]["vs_runner_up"], a["by_decoding"]["greedy"]["vs_runner_up"]
    assert sampling["seeds"] == greedy["seeds"] == [1, 2] and 0 < sampling["lo"] and 0 < greedy["lo"]
    assert sampling["diff"] < greedy["diff"] and a["by_decoding"]["beam5"]["vs_runner_up"] == a["final"]["vs_runner_up"]
    old = synthetic_records([1, 2], bleu, curves)
    del next(r for r in old if r["method"] == "hybrid")["decoding"]["greedy"]["bleu_stats"]  # none kept: no bootstrap
    assert plateau_answer.answer(old)["by_decoding"]["greedy"]["vs_runner_up"] is None
    assert a["cost"]["sentence"]["compute_vs_plain"] == pytest.approx(150 / 300)
    records = synthetic_records([1, 2, 3], bleu, curves, half=True)
    a = plateau_answer.answer(records)
    assert a["complete"] and a["equal_compute"]["vs_token"]["seeds"] == [1, 2, 3]
    assert a["equal_compute"]["compute_vs_token"] == pytest.approx(400 / 400)
    block = "\n".join(plateau_answer.block(a))
    assert "**Best final student: hybrid_kd fixed:0.5.** Test BLEU 34.40 ± 0.20 (beam 5, 3 seeds)" in block
    assert "- Status: final (seeds: plain 3, token 3, sentence 3, hybrid 3)." in block
    assert "gate" not in a and "- **The learned gate** (the paper's gated hybrid, `--kd-gate sentence`): not run yet." \
        in block
    curves["hybrid-gate"], bleu["hybrid-gate"] = curves["hybrid"], 31.0  # a gate 3 BLEU below the fixed 1/2
    a = plateau_answer.answer(synthetic_records([1, 2, 3], bleu, curves, half=True, gate=True))
    assert a["final"]["method"] == "hybrid" and a["gate"]["vs_fixed"]["seeds"] == [1, 2, 3]
    assert a["gate"]["test_bleu"]["mean"] == pytest.approx(31.4) and a["gate"]["vs_fixed"]["hi"] < 0
    gate_line = next(x for x in plateau_answer.block(a) if x.startswith("- **The learned gate**"))
    assert gate_line.startswith("- **The learned gate** (the paper's gated hybrid, `--kd-gate sentence`): 31.40 ± "
                                "0.20 test BLEU (3 seeds); against the fixed 1/2: -")
    assert a["gate"]["complete"] and a["gate"]["verdict"] == "below"
    assert gate_line.endswith("(seeds 1, 2, 3); below it: the fixed 1/2 stays the recommendation."), gate_line
    same = [dict(r, method="hybrid-gate") for r in records if r["method"] == "hybrid"]  # the fixed 1/2's sentences
    a = plateau_answer.answer(records + same)
    assert a["gate"]["verdict"] == "not separated" and a["final"]["method"] == "hybrid"
    assert "(seeds 1, 2, 3); not separated: the fixed 1/2 stays the recommendation (no gate network, the same " \
           "two passes)." in "\n".join(plateau_answer.block(a))
    a = plateau_answer.answer(records + same[:1])  # one seed: a comparison, no verdict yet
    assert not a["gate"]["complete"] and "against the fixed 1/2: +0.00 [+0.00, +0.00], p = 1.000 (seed 1).\n" \
        in "\n".join(plateau_answer.block(a)) + "\n"
    assert [plateau_answer.verdict(dict(lo=lo, hi=hi)) for lo, hi in ((0.1, 2), (-2, -0.1), (-0.1, 0.1))] == [
        "above", "below", "not separated"]
    assert "- **Against plain training** (label-smoothed cross-entropy on the gold targets, 30.40 ± 0.20): " \
           "hybrid_kd fixed:0.5, paired bootstrap +" in block


def test_committed_report_and_answer_are_generated_from_the_committed_records(tmp_path):
    """docs/PLATEAU.md and kd_plugin/plateau_answer.json are what `examples/plateau.py --report` writes from
    docs/plateau_results.json (the driver regenerates and commits them with every record)."""
    from kdexp import plateau_answer

    md, js = str(tmp_path / "P.md"), str(tmp_path / "a.json")
    plateau_report.write(plateau.load_records(), md=md, png=str(tmp_path / "p.png"), answer_json=js)
    for made, committed in ((md, plateau_report.MD), (js, plateau_answer.JSON)):
        with open(made) as f, open(committed) as g:
            assert f.read() == g.read(), committed


def test_curve_wall_continues_across_a_resume(tmp_path):
    """fairseq's wall clock restarts with each process: a resumed part's epochs are offset by the run's wall at
    the epoch it resumed from (here epoch 2, repeated after the stop, counts from epoch 1's wall)."""
    def lines(epoch, wall, bleu):
        return ("2026-12-05 10:00:00 | INFO | train | epoch %03d | loss 3.4 | nll_loss 1.9 | num_updates %d | "
                "train_wall %d | wall %d\n" % (epoch, 10 * epoch, wall - 5, wall) +
                "2026-12-05 10:00:01 | INFO | valid | epoch %03d | valid on 'valid' subset | loss 3.3 | nll_loss 1.7 | "
                "ppl 3.2 | bleu %.2f | num_updates %d | best_bleu %.2f\n" % (epoch, bleu, 10 * epoch, bleu))

    first, second = tmp_path / "train.0.log", tmp_path / "train.log"
    first.write_text(lines(1, 100, 10.0) + lines(2, 210, 12.0))
    second.write_text(lines(2, 95, 12.5) + lines(3, 190, 14.0))
    got = plateau.curve([str(first), str(second)], rows=7)
    assert [(c["epoch"], c["wall"], c["valid_bleu"], c["token_rows"], c["updates"]) for c in got] == [
        (1, 100.0, 10.0, 7, 10), (2, 195.0, 12.5, 14, 20), (3, 290.0, 14.0, 21, 30)]


def test_bracket_reads_the_fixed_epochs_every_seed_decoded():
    """(b)'s test BLEU at the fixed epochs around a compute: the epoch there is compute / token-rows per epoch;
    only epochs every seed decoded count (seed 2 never reached epoch 8)."""
    rs = [{"curve": [{"token_rows": 100}], "fixed_epochs": {"2": 10.0, "4": 20.0, "8": 30.0}},
          {"curve": [{"token_rows": 100}], "fixed_epochs": {"2": 12.0, "4": 22.0}}]
    assert plateau_report.bracket(rs, 300) == "e2 11.00 ± 1.41 / e4 21.00 ± 1.41 (3.0)"
    assert plateau_report.bracket(rs, 400) == "e4 21.00 ± 1.41 (4.0)"
    assert plateau_report.bracket(rs, 700) == "e4 21.00 ± 1.41 (7.0)"
    assert plateau_report.bracket(rs[:1], 700) == "e4 20.00 / e8 30.00 (7.0)"


def test_a_run_whose_training_ended_is_not_trained_again(tmp_path):
    """kdexp.plateau.trained: true only when the last part of the run's log says fairseq-train ended and its best
    checkpoint exists (a stop during decoding must not train more epochs: fairseq forgets its patience count)."""
    class P:
        def path(self, *parts):
            return os.path.join(str(tmp_path), *parts)

    p = P()
    os.makedirs(p.path("logs"))
    os.makedirs(p.path("ckpt", "token-s3"))
    with open(p.path("logs", "train-token-s3.0.log"), "w") as f:
        f.write("2026-12-05 | INFO | fairseq_cli.train | done training in 10.0 seconds\n")
    with open(p.path("logs", "train-token-s3.log"), "w") as f:
        f.write("2026-12-05 | INFO | train | epoch 039 | loss 2.9\n")  # the last part was cut mid-run
    open(p.path("ckpt", "token-s3", "checkpoint_best.pt"), "w").close()
    assert not plateau.trained(p, "token-s3")
    with open(p.path("logs", "train-token-s3.log"), "a") as f:
        f.write("2026-12-05 | INFO | fairseq_cli.train | done training in 3821.5 seconds\n")
    assert plateau.trained(p, "token-s3")
    os.remove(p.path("ckpt", "token-s3", "checkpoint_best.pt"))
    assert not plateau.trained(p, "token-s3")


def test_plateau_table_compares_with_the_best_fully_seeded_other():
    """(a)'s reference for each row is the best mean among the methods with the most seeds: a method with one
    seed so far (here a gate ahead of everything on seed 1) is compared, not compared against."""
    curves = {m: [(100, 10), (200, 20)] for m in list(MAIN) + ["hybrid-gate"]}
    bleu = {"plain": 30, "token": 31, "sentence": 29, "hybrid": 34, "hybrid-gate": 36}
    records = synthetic_records([1, 2, 3], bleu, curves) + [
        r for r in synthetic_records([1], bleu, curves, gate=True) if r["method"] == "hybrid-gate"]
    for r in records:
        r["test_chrf"] = 50.0
    lines = plateau_report.plateau_table(plateau_report.by_method(records, plateau_report.METHODS))
    row = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert row["plain"].endswith("vs hybrid |") and row["hybrid"].endswith("vs token |")
    assert row["hybrid-gate"].endswith("(seed 1) vs hybrid |")
