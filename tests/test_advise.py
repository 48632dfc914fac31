"""kd-advise: the rule's fitting (against brute force), the signals (each against an independent computation on
the toy corpus and teacher), the shipped rule (the fit of its own cells), the console script's JSON (the plateau
answer recommended, the rule's scope check), the text report, bad input."""
import itertools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TEACHER_ARCH
from helpers import TINY_ARCH, run

from kd_plugin import advice
from kd_plugin.cli import advise

METHODS = ["plain", "token", "sentence", "hybrid"]


def cell(name, bleu, **signals):
    sig = {s: 0.0 for s in advice.SIGNALS}
    sig.update(signals)
    return {"cell": name, "signals": sig, "bleu": dict(zip(METHODS, bleu))}


def synthetic_cells(seed=0, n=7):
    """Cells whose best method flips from token to sentence as capacity_ratio falls, plus noise signals."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        ratio = float(rng.uniform(0.05, 0.6))
        token, sentence = 20 + 10 * ratio, 22 - 3 * ratio
        out.append(cell("c%d" % i, [15, token, sentence, (token + sentence) / 2 - 0.1 * rng.rand()],
                        capacity_ratio=ratio, src_len=float(rng.uniform(5, 30)), rare_rate=float(rng.rand())))
    return out


def brute_force_loss(cells):
    """Least BLEU lost over every constant and every (signal, threshold at an observed value, below, above)."""
    best = min(sum(max(c["bleu"].values()) - c["bleu"][m] for c in cells) for m in METHODS)
    for s in advice.SIGNALS:
        for t in {c["signals"][s] for c in cells}:
            for lo, hi in itertools.product(METHODS, METHODS):
                loss = sum(max(c["bleu"].values()) - c["bleu"][lo if c["signals"][s] <= t else hi] for c in cells)
                best = min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_fit_rule_loses_no_more_bleu_than_any_stump(seed):
    cells = synthetic_cells(seed)
    rule = advice.fit_rule(cells, METHODS)
    assert advice.bleu_lost(rule, cells) == pytest.approx(brute_force_loss(cells), abs=1e-9)


def test_fit_rule_finds_the_flip_and_prefers_a_constant():
    cells = synthetic_cells(1)
    rule = advice.fit_rule(cells, METHODS)
    assert (rule["signal"], rule["below"], rule["above"]) == ("capacity_ratio", "sentence", "token")
    flip = 2 / 13  # 20 + 10 r = 22 - 3 r
    below = max(c["signals"]["capacity_ratio"] for c in cells if c["signals"]["capacity_ratio"] < flip)
    above = min(c["signals"]["capacity_ratio"] for c in cells if c["signals"]["capacity_ratio"] > flip)
    assert rule["threshold"] == pytest.approx((below + above) / 2)
    # one method best everywhere: the constant, though stumps tie with it
    flat = [cell("f%d" % i, [1, 2, 3, 4], capacity_ratio=i / 10) for i in range(4)]
    assert advice.fit_rule(flat, METHODS) == {"signal": None, "method": "hybrid"}


def test_leave_one_out_refits_without_the_held_out_cell():
    cells = [cell("a", [0, 2, 1, 0], capacity_ratio=0.1), cell("b", [0, 2, 1, 0], capacity_ratio=0.2),
             cell("c", [0, 1, 2, 0], capacity_ratio=0.5)]
    loo = advice.leave_one_out(cells, METHODS)
    assert [o["pick"] for o in loo] == ["token", "token", "token"]  # without c, nothing says sentence
    assert [o["correct"] for o in loo] == [True, True, False]
    assert [o["bleu_lost"] for o in loo] == [0, 0, 1]
    assert loo[2]["rule"] == {"signal": None, "method": "token"}


def test_teacher_sums_match_float64_loops():
    torch.manual_seed(0)
    lprobs = F.log_softmax(torch.randn(3, 5, 11) * 3, -1)
    target = torch.randint(2, 11, (3, 5))
    target[1, 3:] = 1  # padding
    sums = advice.teacher_sums(lprobs, target, pad=1)
    ent = conf = nll = 0.0
    n = 0
    for b in range(3):
        for t in range(5):
            if target[b, t] == 1:
                continue
            p = [float(x) for x in lprobs[b, t].double().exp()]
            ent -= sum(pi * np.log(pi) for pi in p)
            conf += max(p)
            nll -= float(lprobs[b, t, target[b, t]])
            n += 1
    assert sums["positions"] == n
    assert sums["entropy"] == pytest.approx(ent, rel=1e-9)
    assert sums["confidence"] == pytest.approx(conf, rel=1e-9)
    assert sums["nll"] == pytest.approx(nll, rel=1e-9)


def test_nearest_cell_uses_standardised_signals():
    cells = [cell("a", [0] * 4, capacity_ratio=0.1, src_len=10), cell("b", [0] * 4, capacity_ratio=0.5, src_len=30)]
    # raw distance would pick b (src_len dominates); standardised, 0.12 / 28 is nearer a on ratio and
    # between both on length
    query = dict(cells[0]["signals"], capacity_ratio=0.12, src_len=21)
    assert advice.nearest_cell(cells, query)["cell"] == "a"


def test_shipped_rule_is_the_fit_of_its_own_cells():
    with open(advise.RULE) as f:
        doc = json.load(f)
    cells, methods = doc["cells"], doc["methods"]
    assert len(cells) >= 7 and all(len(c["seeds"]) >= 2 for c in cells)
    assert advice.fit_rule(cells, methods) == doc["rule"]
    loo = advice.leave_one_out(cells, methods)
    assert [o["pick"] for o in loo] == [o["pick"] for o in doc["loo"]["per_cell"]]
    assert doc["loo"]["accuracy"] == pytest.approx(sum(o["correct"] for o in loo) / len(loo))
    assert doc["loo"]["bleu_lost_mean"] == pytest.approx(np.mean([o["bleu_lost"] for o in loo]))


# ---------------------------------------------------------------- the console script on the toy corpus


def transformer_params(v_src, v_tgt, d, f, enc_layers, dec_layers):
    """fairseq's transformer (separate embeddings, untied output projection, post-norm, sinusoidal positions)."""
    attn, ffn, ln = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
    return (v_src + 2 * v_tgt) * d + enc_layers * (attn + ffn + 2 * ln) + dec_layers * (2 * attn + ffn + 3 * ln)


def flag(arch, name):
    return int(arch[arch.index(name) + 1])


def dict_lines(path):
    with open(path) as f:
        return [line.split()[0] for line in f]


@pytest.fixture(scope="module")
def rule(tmp_path_factory):
    """A rule file fitted on the synthetic cells (a stump on capacity_ratio)."""
    path = str(tmp_path_factory.mktemp("rule") / "rule.json")
    cells = synthetic_cells(1)
    loo = advice.leave_one_out(cells, METHODS)
    with open(path, "w") as f:
        json.dump({"methods": METHODS, "rule": advice.fit_rule(cells, METHODS), "cells": cells,
                   "loo": {"cells": len(loo), "accuracy": 0.5, "bleu_lost_mean": 0.25}}, f)
    return path


def synthetic_answer(final, budget, scenario_ratio, greedy="sentence"):
    """A plateau answer (the schema of kdexp.plateau_answer.answer) whose scenario has ``scenario_ratio``, whose
    best final student is ``final`` under beam 5 and ``greedy`` under greedy decoding."""
    bleu = {"mean": 30.0, "std": 0.5, "n": 3}
    return {"version": 1, "source": "docs/PLATEAU.md", "complete": True, "seeds": {m: 3 for m in METHODS},
            "unit_token_rows": 1000, "final": {
                "method": final, "test_bleu": bleu, "runner_up": "plain", "runner_up_bleu": bleu,
                "vs_runner_up": {"diff": 1.0, "lo": 0.5, "hi": 1.5, "p": 0.001, "seeds": [1, 2, 3]},
                "compute_vs_plain": 2.0, "wall_vs_plain": 1.8},
            "budget": [{"fraction": f, "method": m, "value": bleu, "runner_up": "plain", "runner_up_value": bleu,
                        "within_spread": f == 1.0} for f, m in budget],
            "cost": {m: {"compute_vs_plain": 1.0 + i, "wall_vs_plain": 1.5 + i} for i, m in enumerate(METHODS)},
            "by_decoding": {"beam5": {"method": final, "value": bleu, "runner_up": "plain", "runner_up_value": bleu,
                                      "within_spread": False},
                            "greedy": {"method": greedy, "value": bleu, "runner_up": "plain",
                                       "runner_up_value": bleu, "within_spread": False,
                                       "vs_runner_up": {"diff": 0.7, "lo": 0.2, "hi": 1.2, "p": 0.004,
                                                        "seeds": [1, 2, 3]}}},
            "scenario": {"signals": dict({s: 0.0 for s in advice.SIGNALS}, capacity_ratio=scenario_ratio),
                         "student_params": 1, "teacher_params": 1}}


@pytest.fixture(scope="module")
def answer(tmp_path_factory):
    """An answer whose picks differ from the synthetic rule's, and whose scenario has capacity ratio 0 (the
    rule's "below" side)."""
    path = str(tmp_path_factory.mktemp("answer") / "answer.json")
    with open(path, "w") as f:
        json.dump(synthetic_answer("hybrid", [(0.5, "sentence"), (1.0, "token")], 0.0), f)
    return path


@pytest.fixture(scope="module")
def advised(data_bin, teacher, rule, answer):
    out = run("kd-advise", "--data", data_bin, "--teacher", teacher, "--student-arch", " ".join(TINY_ARCH),
              "--sample", "60", "--seed", "3", "--beam", "1", "--rule", rule, "--answer", answer, "--json", "--cpu")
    with open(rule) as f, open(answer) as g:
        return dict(json.loads(out[out.index("{\n"):]), fitted=json.load(f)["rule"], answer=json.load(g))


def test_recommends_the_plateau_answer_with_signals_and_scope(advised):
    rec, ans = advised["advice"], advised["answer"]
    assert set(advised["signals"]) == set(advice.SIGNALS)
    # the recommendation is the answer's for the decoding asked for (--beam 1: greedy), not the rule's
    assert advised["signals"]["decoding"] == 1 and rec["decoding"] == "greedy"
    assert rec["method"] == "sentence" and rec["flags"] == advise.FLAGS["sentence"]
    assert rec["evidence"]["compute_vs_plain"] == ans["cost"]["sentence"]["compute_vs_plain"] == 3.0
    assert rec["evidence"]["vs_runner_up"] == ans["by_decoding"]["greedy"]["vs_runner_up"]  # greedy's bootstrap
    assert [(b["fraction"], b["method"], b["flags"]) for b in rec["budget"]] == [
        (0.5, "sentence", advise.FLAGS["sentence"]), (1.0, "token", advise.FLAGS["token"])]
    # scope: the synthetic rule (a stump on capacity_ratio: sentence below its threshold, token above) applied
    # to these signals, and compared with its pick for the answer's scenario (capacity ratio 0: below)
    rule, scope = advised["fitted"], rec["scope"]
    below = advised["signals"]["capacity_ratio"] <= rule["threshold"]
    assert rule["signal"] == "capacity_ratio" and scope["study_rule"]["rule"] == rule
    assert scope["study_rule"]["method"] == ("sentence" if below else "token")
    assert scope["same_side"] is below and scope["measured"] == ans["scenario"]
    assert set(scope["study_rule"]["confidence"]) >= {"loo_accuracy", "loo_bleu_lost", "nearest_cell",
                                                      "nearest_best", "nearest_margin", "always_bleu_lost"}
    assert advised["info"]["sampled"] == 60 and advised["signals"]["decoding"] == 1


@pytest.mark.parametrize("scenario_ratio", [0.0, 1e9])
def test_text_report_warns_outside_the_plateau_scenarios_side(scenario_ratio):
    """The report names the recommended criterion, the tight-budget ones with their flags, and says OUTSIDE
    exactly when the study's rule puts the scenario and the user's signals on different sides of its split."""
    cells = synthetic_cells(1)
    doc = {"rule": advice.fit_rule(cells, METHODS), "cells": cells, "loo": {"cells": 7, "accuracy": 0.5,
                                                                             "bleu_lost_mean": 0.25}}
    signals = dict(cells[0]["signals"], capacity_ratio=0.0)
    ans = synthetic_answer("token", [(0.25, "sentence"), (1.0, "token")], scenario_ratio)
    rec = advise.advise(ans, doc, signals)
    info = {"student_params": 1, "teacher_params": 2, "decoding": "beam", "sentences": 9, "split": "train",
            "rare_from_index": 5, "sampled": 9}
    text = advise.text_report({"advice": rec, "signals": signals, "info": info})
    assert text.startswith("recommendation: token_kd (the best final student at the plateau, beam 5)")
    assert "paired bootstrap over the seeds both have (1, 2, 3): +1.00 [+0.50, +1.50], p = 0.001" in text
    assert "0.25x sentence_kd; 1x token_kd (tied with label_smoothed_cross_entropy (no KD) within the seeds' spread)" in text
    assert "  sentence_kd flags: %s" % advise.FLAGS["sentence"] in text
    assert ("OUTSIDE" in text) is (scenario_ratio > doc["rule"]["threshold"])
    assert "at equal compute" not in text  # no hybrid-half runs in this answer
    assert "against plain training" not in text  # this answer's final student has no bootstrap against plain
    ans["final"].update(plain_bleu={"mean": 30.0, "std": 0.5, "n": 3},
                        vs_plain={"diff": 2.5, "lo": 2.0, "hi": 3.0, "p": 0.0, "seeds": [1, 2, 3]})
    text = advise.text_report({"advice": advise.advise(ans, doc, signals), "signals": signals, "info": info})
    assert ("  against plain training (no KD, 30.00 ± 0.50): +2.50 [+2.00, +3.00] BLEU (paired bootstrap, "
            "seeds 1, 2, 3)") in text
    ans["equal_compute"] = {"vs_token": {"diff": -0.49, "lo": -1.22, "hi": 0.22, "p": 0.9, "seeds": [1]}}
    text = advise.text_report({"advice": advise.advise(ans, doc, signals), "signals": signals, "info": info})
    assert ("  at equal compute (half the epochs, annealed): -0.49 [-1.22, +0.22] BLEU against token_kd (paired "
            "bootstrap, seeds 1)") in text
    assert "capacity_ratio      0.000  (student 1 / teacher 2 parameters)  (plateau scenario %.4g)" % scenario_ratio \
        in text


def test_shipped_answer_names_known_methods():
    with open(advise.ANSWER) as f:
        ans = json.load(f)
    assert ans["final"]["method"] in advise.FLAGS and all(b["method"] in advise.FLAGS for b in ans["budget"])


def test_capacity_ratio_is_the_architectures_parameter_ratio(advised, data_bin):
    v_src, v_tgt = (len(dict_lines(os.path.join(data_bin, "dict.%s.txt" % lang))) + 4 for lang in ("src", "tgt"))

    def params(arch):
        return transformer_params(v_src, v_tgt, flag(arch, "--encoder-embed-dim"), flag(arch, "--encoder-ffn-embed-dim"),
                                  flag(arch, "--encoder-layers"), flag(arch, "--decoder-layers"))

    assert advised["info"]["student_params"] == params(TINY_ARCH)
    assert advised["info"]["teacher_params"] == params(TEACHER_ARCH)
    assert advised["signals"]["capacity_ratio"] == pytest.approx(params(TINY_ARCH) / params(TEACHER_ARCH))


def test_source_signals_match_the_text(advised, data_bin):
    symbols = dict_lines(os.path.join(data_bin, "dict.src.txt"))
    index = {s: 4 + i for i, s in enumerate(symbols)}  # after <s> <pad> </s> <unk>
    first_rare = 4 + len(symbols) // 4
    with open(os.path.join(os.path.dirname(data_bin), "text", "train.src")) as f:
        sentences = [line.split() for line in f]
    pieces = [w for s in sentences for w in s]
    assert advised["info"]["rare_from_index"] == first_rare
    assert advised["signals"]["src_len"] == pytest.approx(len(pieces) / len(sentences))
    assert advised["signals"]["rare_rate"] == pytest.approx(sum(index[w] >= first_rare for w in pieces) / len(pieces))
    assert 0 < advised["signals"]["rare_rate"] < 1


def test_teacher_signals_match_a_sentence_by_sentence_float64_pass(advised, data_bin, teacher):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([teacher], arg_overrides={"data": data_bin})
    model = models[0].eval()
    task.load_dataset("train")
    ds = task.dataset("train")
    ids = np.random.RandomState(3).choice(len(ds), 60, replace=False)
    ent, conf, nll = [], [], []
    with torch.no_grad():
        for i in ids:
            s = ds.collater([ds[int(i)]])
            lp = F.log_softmax(model(**s["net_input"])[0][0].double(), -1)
            tgt = s["target"][0]
            ent += (-(lp.exp() * lp).sum(-1)).tolist()
            conf += lp.exp().max(-1).values.tolist()
            nll += (-lp.gather(-1, tgt[:, None])[:, 0]).tolist()
    sig = advised["signals"]
    assert sig["teacher_entropy"] == pytest.approx(np.mean(ent), rel=1e-4)
    assert sig["teacher_confidence"] == pytest.approx(np.mean(conf), rel=1e-4)
    assert sig["teacher_nll"] == pytest.approx(np.mean(nll), rel=1e-4)


def test_decoding_levels():
    assert [advice.decoding_level(5, False), advice.decoding_level(1, False), advice.decoding_level(5, True)] == [0, 1, 2]


# ---------------------------------------------------------------- bad input


def bad(capsys, argv):
    with pytest.raises(SystemExit) as e:
        advise.cli_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd-advise: error: ")]
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("arch, fragment", [("--encoder-layers 1", "no --arch"),
                                            ("--arch nosuch", "invalid choice"),
                                            ("--arch transformer --share-all-embeddings", "fairseq cannot build"),
                                            ("--arch 'transformer", "quotation")])
def test_bad_student_arch_is_one_line(capsys, data_bin, teacher, rule, arch, fragment):
    line = bad(capsys, ["--data", data_bin, "--teacher", teacher, "--student-arch", arch, "--rule", rule])
    assert "--student-arch" in line and fragment in line, line


def test_bad_files_are_one_line(capsys, data_bin, teacher, rule, tmp_path):
    arch = " ".join(TINY_ARCH)
    garbage = tmp_path / "rule.json"
    garbage.write_text("{not json")
    cases = [(["--data", str(tmp_path / "none"), "--teacher", teacher], "--data"),
             (["--data", data_bin, "--teacher", str(tmp_path / "t.pt")], "--teacher"),
             (["--data", data_bin, "--teacher", teacher, "--split", "nosuch"], "--split"),
             (["--data", data_bin, "--teacher", teacher, "--rule", str(garbage)], "--rule"),
             (["--data", data_bin, "--teacher", teacher, "--answer", rule], "--answer")]  # a rule is no answer
    for argv, name in cases:
        argv += [] if "--rule" in argv else ["--rule", rule]
        assert name in bad(capsys, argv + ["--student-arch", arch])
