"""kd-export: a KD student (task translation_kd in its saved config, exported without --user-dir), checked here
independently of the tool's own check: stock ``fairseq-generate --beam 1`` on the toy validation set against
``ctranslate2.Translator`` on the raw validation text, exactly equal for float32 weights; the int8 agreement the
tool prints equals the one measured here. A plain fairseq checkpoint (the conftest teacher) is exported by the
overwrite case. Bad input: one line naming the flag or file, exit status 2, nothing written; a failed check:
exit status 1, nothing written.

The float32 export runs as the console script; the other cases one after another in one process that imported
kd-export once (RUNNER: the fairseq import is most of a failing run's time).
"""
import json
import os
import re
import shutil
import sys

import ctranslate2
import pytest
import torch

from helpers import kd_train, load_state, run

# kd-export's entry point on [[argv, log, patch], ...] (a JSON file), sequentially in one process; writes
# log.rc. patch "wrong_ct2": the CTranslate2 side of the check returns a wrong token, so the check must fail.
RUNNER = r"""
import contextlib, json, logging, sys, traceback
logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)  # fairseq's log lines stay out of the logs
from kd_plugin.cli import export, export_check
original = export_check.ctranslate2_greedy
wrong = lambda translator, sentences, *a: [["b0"] for _ in sentences]
for argv, log, patch in json.load(open(sys.argv[1])):
    export_check.ctranslate2_greedy = wrong if patch == "wrong_ct2" else original
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            export.cli_main(argv); code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(); code = 1
    with open(log + ".rc", "w") as f:
        f.write(str(code))
"""


@pytest.fixture(scope="module")
def student(tmp_path_factory, data_bin, teacher):
    """A token_kd student of the toy teacher (fairseq-train --user-dir kd_plugin --task translation_kd)."""
    save = str(tmp_path_factory.mktemp("export_student"))
    kd_train(data_bin, save, "--teacher-path", teacher, "--criterion", "token_kd", "--kd-alpha", "0.5",
             "--label-smoothing", "0.1", max_update=100)
    return os.path.join(save, "checkpoint_last.pt")


def fairseq_greedy(data_bin, ckpt):
    """Stock fairseq-generate (no --user-dir), beam 1, fairseq's default length cap: valid hypotheses in order."""
    log = run("fairseq-generate", data_bin, "--path", ckpt, "--gen-subset", "valid", "--beam", "1",
              "--batch-size", "50")
    hyps = {}
    for line in log.splitlines():
        m = re.match(r"H-(\d+)\t[^\t]*\t?(.*)$", line)
        if m:
            hyps[int(m.group(1))] = m.group(2).split()
    assert sorted(hyps) == list(range(100)), log[-2000:]
    return [hyps[i] for i in range(100)]


def ctranslate2_greedy(model_dir, data_bin, one_at_a_time=False):
    """The exported model on the raw toy validation source (the text fairseq-preprocess binarized)."""
    with open(os.path.join(os.path.dirname(data_bin), "text", "valid.src")) as f:
        src = [line.split() for line in f.read().splitlines()]
    translator = ctranslate2.Translator(model_dir, device="cpu", intra_threads=1)
    batches = [[s] for s in src] if one_at_a_time else [src]
    return [r.hypotheses[0] for batch in batches
            for r in translator.translate_batch(batch, beam_size=1, max_decoding_length=200, min_decoding_length=1)]


def no_temp_dirs(out):
    parent, name = os.path.split(out)
    return [e for e in os.listdir(parent) if e.startswith(".%s.tmp." % name)] == []


@pytest.fixture(scope="module")
def reference(data_bin, student):
    return fairseq_greedy(data_bin, student)


@pytest.fixture(scope="module")
def float32_export(tmp_path_factory, data_bin, student):
    """kd-export (the console script) of the KD student with float32 weights: (out dir, output)."""
    out = os.path.join(str(tmp_path_factory.mktemp("export_float32")), "student")
    return out, run("kd-export", "--path", student, "--data", data_bin, "--out", out, "--quantization", "none")


def test_kd_student_float32_export_round_trips(float32_export, reference, data_bin, student):
    assert load_state(student)["cfg"]["task"]["_name"] == "translation_kd"  # and no --user-dir was passed
    out, log = float32_export
    assert "identical to fairseq's on 20/20 valid sentences" in log
    assert len({tuple(h) for h in reference}) > 50  # real translations, not one degenerate output
    assert ctranslate2_greedy(out, data_bin) == reference
    with open(os.path.join(out, "kd_export.json")) as f:
        meta = json.load(f)
    assert meta["quantization"] == "none" and meta["ctranslate2"] == ctranslate2.__version__
    assert meta["check"]["agreement_percent"] == 100.0 and meta["check"]["sentences"] == 20
    with open(os.path.join(out, "README.txt")) as f:
        assert "ctranslate2.Translator" in f.read()
    assert no_temp_dirs(out)


def test_int8_export_reports_its_agreement(cases, outcomes, reference, data_bin, float32_export):
    log, rc = outcomes["int8"]
    out = cases[1]["int8"][1]
    assert rc == 0, log[-2000:]
    m = re.search(r"identical to fairseq's on (\d+)/100 valid sentences", log)
    assert m, log[-2000:]
    ours = ctranslate2_greedy(out, data_bin, one_at_a_time=True)
    assert int(m.group(1)) == sum(a == b for a, b in zip(ours, reference))
    assert int(m.group(1)) >= 50
    size = os.path.getsize(os.path.join(out, "model.bin"))
    assert size < 0.8 * os.path.getsize(os.path.join(float32_export[0], "model.bin"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory, data_bin, teacher, student):
    """{case: (argv, --out, patch, expected status, words the error line names)}, and their inputs."""
    root = str(tmp_path_factory.mktemp("export_cases"))
    p = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    with open(p("junk.pt"), "w") as f:
        f.write("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, p("weights.pt"))
    no_dict = shutil.copytree(data_bin, p("no_dict"))
    os.remove(os.path.join(no_dict, "dict.tgt.txt"))
    other_dict = shutil.copytree(data_bin, p("other_dict"))
    with open(os.path.join(other_dict, "dict.tgt.txt"), "a") as f:
        f.write("extra 1\n")
    # examples/demo.py's layout: WORK/data-bin and WORK/bpe/spm.model
    shutil.copytree(data_bin, p("work", "data-bin"))
    os.makedirs(p("work", "bpe"))
    with open(p("work", "bpe", "spm.model"), "wb") as f:
        f.write(b"sentencepiece model bytes")
    # a student trained on DATA=a:b with --teacher-targets x:y: translation_kd itself refuses one data dir
    state = load_state(student)
    state["cfg"]["model"].teacher_targets = state["cfg"]["task"]["teacher_targets"] = p("x") + ":" + p("y")
    torch.save(state, p("student_ab.pt"))
    for d in ("exists", "replaced"):
        os.makedirs(p(d))
        with open(p(d, "old"), "w") as f:
            f.write("old export\n")
    ok = ["--path", teacher, "--data", data_bin, "--quantization", "none"]
    table = {
        "missing_checkpoint": (["--path", p("nope.pt"), "--data", data_bin], "out1", None, 2, ["--path", "nope.pt"]),
        "not_a_checkpoint": (["--path", p("junk.pt"), "--data", data_bin], "out2", None, 2, ["--path", "junk.pt"]),
        "not_fairseq": (["--path", p("weights.pt"), "--data", data_bin], "out3", None, 2, ["--path", "weights.pt"]),
        "missing_dict": (["--path", teacher, "--data", no_dict], "out4", None, 2, ["--data", "dict.tgt.txt"]),
        "other_dict": (["--path", teacher, "--data", other_dict], "out5", None, 2, ["--data", "dict.tgt.txt"]),
        "bad_quantization": (ok + ["--quantization", "int4"], "out6", None, 2, ["--quantization", "int4"]),
        "missing_spm": (ok + ["--spm", p("nope.model")], "out7", None, 2, ["--spm", "nope.model"]),
        "missing_split": (ok + ["--split", "dev"], "out8", None, 2, ["--split", "dev"]),
        "out_exists": (ok, "exists", None, 2, ["--out", "exists", "--overwrite"]),
        "check_fails": (ok + ["--overwrite", "--check", "5"], "exists", "wrong_ct2", 1, ["check failed", "0.0%"]),
        "int8": (["--path", student, "--data", data_bin, "--check", "100", "--min-agreement", "50"], "int8", None,
                 0, []),
        "kd_training_inputs": (["--path", p("student_ab.pt"), "--data", data_bin, "--check", "5"], "ab", None, 0, []),
        "overwrite": (["--path", teacher, "--data", p("work", "data-bin"), "--quantization", "none", "--check", "5",
                       "--overwrite"], "replaced", None, 0, []),
    }
    return root, {case: (argv + ["--out", p(out)], p(out), patch, status, words)
                  for case, (argv, out, patch, status, words) in table.items()}


@pytest.fixture(scope="module")
def outcomes(cases):
    """Every case run once (RUNNER): {case: (output, exit status)}."""
    root, table = cases
    jobs = [[argv, os.path.join(root, case + ".log"), patch] for case, (argv, _, patch, _, _) in table.items()]
    with open(os.path.join(root, "jobs.json"), "w") as f:
        json.dump(jobs, f)
    run(sys.executable, "-c", RUNNER, os.path.join(root, "jobs.json"))
    result = {}
    for case, (_, log, _) in zip(table, jobs):
        with open(log) as f, open(log + ".rc") as rc:
            result[case] = (f.read(), int(rc.read()))
    return result


@pytest.mark.parametrize("case", ["missing_checkpoint", "not_a_checkpoint", "not_fairseq", "missing_dict",
                                  "other_dict", "bad_quantization", "missing_spm", "missing_split", "out_exists",
                                  "check_fails"])
def test_bad_input_writes_nothing(case, cases, outcomes):
    _, table = cases
    _, out, _, status, words = table[case]
    log, rc = outcomes[case]
    assert rc == status, log[-2000:]
    errors = [line for line in log.splitlines() if re.match(r"kd-export: (error|check failed): ", line)]
    assert len(errors) == 1 and errors[0] == log.strip().splitlines()[-1], log[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    if case in ("out_exists", "check_fails"):  # the existing export is untouched
        assert os.listdir(out) == ["old"]
    else:
        assert not os.path.exists(out)
    assert no_temp_dirs(out)


def test_overwrite_replaces_and_ships_the_demo_spm(cases, outcomes):
    root, table = cases
    log, rc = outcomes["overwrite"]
    out = table["overwrite"][1]
    assert rc == 0, log[-2000:]
    assert "old" not in os.listdir(out) and "model.bin" in os.listdir(out)
    with open(os.path.join(out, "spm.model"), "rb") as f:
        assert f.read() == b"sentencepiece model bytes"
    with open(os.path.join(out, "README.txt")) as f:
        assert "spm.model" in f.read()
    assert no_temp_dirs(out)


def test_kd_student_exports_without_its_training_inputs(cases, outcomes):
    """The converter builds the stock translation task, not translation_kd (whose start-up checks of the
    training inputs would refuse this student: two --teacher-targets directories for one data dir)."""
    log, rc = outcomes["kd_training_inputs"]
    assert rc == 0, log[-2000:]
    assert "identical to fairseq's on 5/5 valid sentences" in log
    assert os.path.isfile(os.path.join(cases[1]["kd_training_inputs"][1], "model.bin"))
