"""kd-export: a KD student (task translation_kd in its saved config, exported without --user-dir), checked here
independently of the tool's own check: stock ``fairseq-generate --beam 1`` on the toy validation set against
``ctranslate2.Translator`` on the raw validation text, exactly equal for float32 weights; the int8 export's step
agreement the tool prints equals the one measured here step by step (one ``target_prefix`` decoding per step), and
its identical sentences too. A plain fairseq checkpoint (the conftest teacher) is exported by the overwrite case.
Bad input: one line naming the flag or file, exit status 2, nothing written; a failed check (a wrong float32
conversion, for a float32 and for an int8 export; an int8 export whose vocabulary is off by one, under the default
--min-agreement): exit status 1, nothing written.

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
from kd_plugin.cli.export import DEFAULT_MIN_AGREEMENT

# kd-export's entry point on [[argv, log, patch], ...] (a JSON file), sequentially in one process; writes
# log.rc. patch "wrong_ct2": the CTranslate2 greedy decoding of the float32 conversion returns a wrong token;
# "shifted_vocab": the quantized export's target vocabulary is off by one entry (its float32 conversion is right).
RUNNER = r"""
import contextlib, json, logging, os, sys, traceback
logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)  # fairseq's log lines stay out of the logs
from kd_plugin.cli import export, export_check
original, original_convert = export_check.ctranslate2_greedy, export.convert
wrong = lambda translator, sentences, *a: [["b0"] for _ in sentences]
def shifted(state, args, tmp_dir, model_dir, src, tgt, quantization=None):
    original_convert(state, args, tmp_dir, model_dir, src, tgt, quantization)
    if (quantization or args.quantization) not in ("none", "float32"):
        path = os.path.join(model_dir, "target_vocabulary.json")
        vocab = json.load(open(path))
        json.dump(vocab[:4] + vocab[5:] + vocab[4:5], open(path, "w"))
for argv, log, patch in json.load(open(sys.argv[1])):
    export_check.ctranslate2_greedy = wrong if patch == "wrong_ct2" else original
    export.convert = shifted if patch == "shifted_vocab" else original_convert
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


def valid_source(data_bin):
    """The raw toy validation source (the text fairseq-preprocess binarized), tokens per sentence."""
    with open(os.path.join(os.path.dirname(data_bin), "text", "valid.src")) as f:
        return [line.split() for line in f.read().splitlines()]


def ctranslate2_greedy(model_dir, data_bin, one_at_a_time=False):
    """The exported model on the raw toy validation source."""
    src = valid_source(data_bin)
    translator = ctranslate2.Translator(model_dir, device="cpu", intra_threads=1)
    batches = [[s] for s in src] if one_at_a_time else [src]
    return [r.hypotheses[0] for batch in batches
            for r in translator.translate_batch(batch, beam_size=1, max_decoding_length=200, min_decoding_length=1)]


def steps_by_prefix(model_dir, data_bin, reference):
    """(agreeing steps, steps) of the export against fairseq's greedy ``reference``, the definition spelled out:
    for every step t of each reference (its tokens and its EOS), the export's next token after the reference's
    first t tokens (one ``target_prefix`` decoding of length t + 1 per step) is compared with the reference's."""
    translator = ctranslate2.Translator(model_dir, device="cpu", intra_threads=1)
    agree = steps = 0
    for src, ref in zip(valid_source(data_bin), reference):
        assert len(ref) < 199  # no output at fairseq-generate's cap: its final EOS is fairseq's own decision
        for t, expected in enumerate(ref + ["</s>"]):
            out = translator.translate_batch([src], target_prefix=[ref[:t]] if t else None, beam_size=1,
                                             max_decoding_length=t + 1, min_decoding_length=1)[0].hypotheses[0]
            assert out[:t] == ref[:t]
            agree += (out[t] if len(out) > t else "</s>") == expected
            steps += 1
    return agree, steps


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
    assert "float32 conversion: greedy output identical to fairseq's on 20/20 valid sentences" in log
    assert len({tuple(h) for h in reference}) > 50  # real translations, not one degenerate output
    assert ctranslate2_greedy(out, data_bin) == reference
    with open(os.path.join(out, "kd_export.json")) as f:
        meta = json.load(f)
    assert meta["quantization"] == "none" and meta["ctranslate2"] == ctranslate2.__version__
    assert meta["check"]["agreement_percent"] == meta["check"]["step_agreement_percent"] == 100.0
    assert meta["check"]["sentences"] == meta["check"]["float32_identical_sentences"] == 20
    with open(os.path.join(out, "README.txt")) as f:
        assert "ctranslate2.Translator" in f.read()
    assert no_temp_dirs(out)


def test_int8_export_reports_its_agreement(cases, outcomes, reference, data_bin, float32_export):
    """Under the default --min-agreement: the float32 conversion identical on all 100 sentences, the int8 export's
    greedy steps and identical sentences as measured here, in the log and in kd_export.json."""
    log, rc = outcomes["int8"]
    out = cases[1]["int8"][1]
    assert rc == 0, log[-2000:]
    assert "float32 conversion: greedy output identical to fairseq's on 100/100 valid sentences" in log
    m = re.search(r"int8 export \(computed as (\w+)\): (\d+)/(\d+) greedy steps agree with fairseq's given its "
                  r"prefix \(([\d.]+)%%; required %s%%\); identical sentences (\d+)/100" % DEFAULT_MIN_AGREEMENT, log)
    assert m, log[-2000:]
    agree, steps = steps_by_prefix(out, data_bin, reference)
    assert (int(m.group(2)), int(m.group(3))) == (agree, steps)
    ours = ctranslate2_greedy(out, data_bin, one_at_a_time=True)
    assert int(m.group(5)) == sum(a == b for a, b in zip(ours, reference))
    assert DEFAULT_MIN_AGREEMENT <= 100.0 * agree / steps < 100  # toy int8: some near-ties flip
    with open(os.path.join(out, "kd_export.json")) as f:
        check = json.load(f)["check"]
    assert check["steps"] == steps and check["step_agreement_percent"] == round(100.0 * agree / steps, 2)
    assert check["compute_type"] == m.group(1) and check["required_percent"] == DEFAULT_MIN_AGREEMENT
    assert check["agreement_percent"] == int(m.group(5)) and check["float32_identical_sentences"] == 100
    assert [e for e in os.listdir(out) if "float32" in e] == []  # the float32 conversion is not shipped
    size = os.path.getsize(os.path.join(out, "model.bin"))
    assert size < 0.8 * os.path.getsize(os.path.join(float32_export[0], "model.bin"))


def test_int8_gemm_note_names_the_saturating_backend(tmp_path):
    """The note of a CPU that is not Intel's and has no VNNI (oneDNN's int8 GEMM), only for int8 arithmetic and
    not with CT2_USE_MKL=1."""
    from kd_plugin.cli.export_check import int8_gemm_note

    def cpu(vendor, flags):
        path = tmp_path / vendor
        path.write_text("vendor_id\t: %s\nflags\t\t: fpu sse avx avx2 %s\n" % (vendor, flags))
        return str(path)

    amd = cpu("AuthenticAMD", "fma f16c")
    assert "compute_type='float32'" in int8_gemm_note("int8_float32", {}, amd)
    assert int8_gemm_note("int8_float32", {"CT2_USE_MKL": "1"}, amd) is None
    assert int8_gemm_note("float32", {}, amd) is None
    assert int8_gemm_note("int8_float32", {}, cpu("GenuineIntel", "fma")) is None
    assert int8_gemm_note("int8", {}, cpu("AuthenticAMD", "avx512f avx512_vnni")) is None
    assert int8_gemm_note("int8", {}, str(tmp_path / "missing")) is None


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
        "bad_min_agreement": (ok + ["--min-agreement", "101"], "out9", None, 2, ["--min-agreement", "101"]),
        "check_fails": (ok + ["--overwrite", "--check", "5"], "exists", "wrong_ct2", 1,
                        ["check failed", "float32 conversion", "5 of 5 sentences"]),
        "check_fails_int8": (["--path", student, "--data", data_bin, "--check", "5"], "out10", "wrong_ct2", 1,
                             ["check failed", "float32 conversion", "5 of 5 sentences"]),
        "int8_vocab_off_by_one": (["--path", student, "--data", data_bin, "--check", "20"], "out11", "shifted_vocab",
                                  1, ["check failed", "int8 export", "%s%% required" % DEFAULT_MIN_AGREEMENT,
                                      "fairseq"]),
        "int8": (["--path", student, "--data", data_bin, "--check", "100"], "int8", None, 0, []),
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
                                  "bad_min_agreement", "check_fails", "check_fails_int8", "int8_vocab_off_by_one"])
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


def test_broken_int8_export_fails_far_below_the_default(outcomes):
    """The off-by-one vocabulary passes the exact float32 conversion check (the conversion is right) and fails
    the int8 step rule far below the default: only the steps where fairseq ends the sentence agree."""
    log, rc = outcomes["int8_vocab_off_by_one"]
    assert "float32 conversion: greedy output identical to fairseq's on 20/20 valid sentences" in log
    m = re.search(r"check failed: int8 export: ([\d.]+)% of (\d+) greedy steps agree", log)
    assert rc == 1 and m, log[-2000:]
    assert float(m.group(1)) < 30


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
    assert "identical to fairseq's on 5/5 valid sentences" in log and "int8 export" in log
    assert os.path.isfile(os.path.join(cases[1]["kd_training_inputs"][1], "model.bin"))
