"""Bad input to ``fairseq-train --task translation_kd``: one clear error naming the file or flag, a non-zero
exit status, and no checkpoint in --save-dir.

Every case is a whole fairseq-train run in its own process: three as fresh ``fairseq-train`` commands, the
others as forks of one process that imported fairseq once (WARM_RUNNER: the import is most of a failing
run's time), two at a time. The inputs are the shared toy corpus and teacher (conftest) plus, built here:
teachers trained on the same sentences with another source or target vocabulary, teacher-decoded targets
and top-K caches made for other data or truncated, and a teacher whose logits are NaN.
"""
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from helpers import TINY_ARCH, TRAIN_COMMON, USER_DIR, load_state, make_corpus, preprocess, run, train

from kd_plugin.cli import distill_corpus, dump_teacher

TGT = "%s.src-tgt.tgt"  # binarized target (gold or teacher-decoded) of a split
CACHE = (".lprobs.f16", ".ids.u16", ".rest.f16", ".idx", ".json")
# the line fairseq-train's traceback ends with, or argparse's error line
ERROR_LINE = re.compile(r"^(kd_plugin\.checks\.KDConfigError|FloatingPointError|fairseq-train: error): (.*)$")


def variant_corpus(root, side):
    """conftest's toy corpus (same sentences) with one side's words renamed: another dictionary.

    source: a<i> -> e<i mod 15> (15 types instead of 20, but fairseq pads both dictionaries to 24 entries);
    target: b<i> -> d<i>, c<i> -> f<i> (same size, other symbols). Only the dictionary files tell them apart.
    """
    text = os.path.join(root, "text")
    make_corpus(text)
    rename = {"src": lambda w: "e%d" % (int(w[1:]) % 15),
              "tgt": lambda w: {"b": "d", "c": "f"}[w[0]] + w[1:]}[side]
    for split in ("train", "valid", "test"):
        path = os.path.join(text, "%s.%s" % (split, side))
        with open(path) as f:
            lines = [" ".join(rename(w) for w in line.split()) for line in f.read().splitlines()]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    preprocess(text, os.path.join(root, "bin"))
    save = os.path.join(root, "teacher")
    # stock fairseq-train (no --user-dir, so without kd_plugin.fairseq_patches' clean shutdown of the prefetch thread)
    # stopping right after an update may abort at exit (status 134); --data-buffer-size 0: no such thread
    train(os.path.join(root, "bin"), save, "--criterion", "cross_entropy", "--disable-validation",
          "--data-buffer-size", "0", max_update=20)
    return os.path.join(root, "bin"), os.path.join(save, "checkpoint_last.pt")


def nan_teacher(teacher, path):
    """A copy of ``teacher`` whose output projection has a NaN row: NaN logits for that token."""
    state = load_state(teacher)
    state["model"]["decoder.output_projection.weight"][4] = float("nan")
    torch.save(state, path)
    return path


def copy_split(src_prefix, dst_prefix, suffixes=(".bin", ".idx")):
    os.makedirs(os.path.dirname(dst_prefix), exist_ok=True)
    for s in suffixes:
        shutil.copy(src_prefix + s, dst_prefix + s)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_bin, teacher):
    """Paths of every bad input (see the module doc)."""
    root = tmp_path_factory.mktemp("bad")
    p = SimpleNamespace(root=str(root))
    with ThreadPoolExecutor(2) as pool:
        src, tgt = pool.map(variant_corpus, [str(root / "src"), str(root / "tgt")], ["src", "tgt"])
    (p.src_bin, p.src_teacher), (p.tgt_bin, p.tgt_teacher) = src, tgt

    # teacher checkpoints: truncated, not a fairseq checkpoint, dictionaries gone
    p.truncated = str(root / "truncated.pt")
    with open(teacher, "rb") as f, open(p.truncated, "wb") as out:
        out.write(f.read()[: os.path.getsize(teacher) // 2])
    p.not_fairseq = str(root / "weights.pt")
    torch.save({"weights": torch.zeros(3)}, p.not_fairseq)
    state = load_state(p.src_teacher)
    state["cfg"]["task"]["data"] = str(root / "moved")  # its dictionaries are gone
    p.no_dict = str(root / "no_dict.pt")
    torch.save(state, p.no_dict)
    p.nan_teacher = nan_teacher(teacher, str(root / "nan.pt"))

    # teacher-decoded targets (the gold binarized targets stand in): too many and too few sentences
    p.more = str(root / "more")
    copy_split(os.path.join(data_bin, TGT % "train"), os.path.join(p.more, TGT % "valid"))
    p.fewer = str(root / "fewer")
    copy_split(os.path.join(data_bin, TGT % "valid"), os.path.join(p.fewer, TGT % "valid"))
    copy_split(os.path.join(data_bin, TGT % "valid"), os.path.join(p.fewer, TGT % "train"))
    # ... and real ones decoded with another target dictionary (same sentence count)
    p.other_targets = str(root / "other_targets")
    distill_corpus.cli_main(["--data", p.tgt_bin, "--path", p.tgt_teacher, "--split", "valid", "--out",
                             p.other_targets, "--beam", "1"])

    # top-K caches: K=4; another split's, renamed; another dictionary's; truncated
    def dump(data, path, split, out):
        dump_teacher.cli_main(["--data", data, "--path", path, "--split", split, "--out", out, "--topk", "4"])

    p.cache4 = str(root / "cache4")
    dump(data_bin, teacher, "valid", p.cache4)
    p.test_cache = str(root / "test_cache")
    dump(data_bin, teacher, "test", str(root / "test_dump"))
    copy_split(os.path.join(str(root / "test_dump"), "test.topk"), os.path.join(p.test_cache, "valid.topk"), CACHE)
    p.other_cache = str(root / "other_cache")
    dump(p.tgt_bin, p.tgt_teacher, "valid", p.other_cache)
    p.cut_cache = str(root / "cut_cache")
    copy_split(os.path.join(p.cache4, "valid.topk"), os.path.join(p.cut_cache, "valid.topk"), CACHE)
    with open(os.path.join(p.cut_cache, "valid.topk.lprobs.f16"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 16)
    return p


TOKEN = ["--criterion", "token_kd"]

# id: (fairseq-train flags after the data dir, given the inputs p and the good teacher t;
#      fragments the one error line must contain; whether it fails in the first update, not at start-up)
CASES = {
    "teacher_missing": (lambda p, t: TOKEN + ["--teacher-path", p.root + "/nosuch.pt"],
                        lambda p, t: ["--teacher-path", "not found", p.root + "/nosuch.pt"], False),
    "teacher_truncated": (lambda p, t: TOKEN + ["--teacher-path", p.truncated],
                          lambda p, t: ["--teacher-path", p.truncated, "not a readable fairseq checkpoint"], False),
    "teacher_not_fairseq": (lambda p, t: TOKEN + ["--teacher-path", p.not_fairseq],
                            lambda p, t: ["--teacher-path", p.not_fairseq, "not a readable fairseq checkpoint"],
                            False),
    "teacher_source_dict": (lambda p, t: TOKEN + ["--teacher-path", p.src_teacher],
                            lambda p, t: [p.src_teacher, "different source dictionary", p.src_bin + "/dict.src.txt"],
                            False),
    "teacher_target_dict": (lambda p, t: TOKEN + ["--teacher-path", p.tgt_teacher],
                            lambda p, t: [p.tgt_teacher, "different target dictionary", p.tgt_bin + "/dict.tgt.txt"],
                            False),
    # 15 source types padded to 24 like the task's 20: only the dictionary file could tell them apart
    "teacher_dict_unknown": (lambda p, t: TOKEN + ["--teacher-path", p.no_dict],
                             lambda p, t: [p.no_dict, "cannot check its source dictionary",
                                           p.root + "/moved/dict.src.txt"], False),
    "ensemble_member_dict": (lambda p, t: TOKEN + ["--teacher-path", t + ":" + p.tgt_teacher],
                             lambda p, t: [p.tgt_teacher, "different target dictionary"], False),
    "targets_more": (lambda p, t: ["--criterion", "sentence_kd", "--teacher-targets", p.more],
                     lambda p, t: ["--teacher-targets", p.more + "/" + TGT % "valid" + ".bin",
                                   "holds 1500 sentences but the valid split has 100"], False),
    "targets_fewer": (lambda p, t: ["--criterion", "sentence_kd", "--teacher-targets", p.fewer],
                      lambda p, t: ["--teacher-targets", p.fewer + "/" + TGT % "train" + ".bin",
                                    "holds 100 sentences but the train split has 1500"], False),
    "targets_other_dict": (lambda p, t: ["--criterion", "sentence_kd", "--teacher-targets", p.other_targets],
                           lambda p, t: ["--teacher-targets", p.other_targets + "/" + TGT % "valid" + ".json",
                                         "another target dictionary"], False),
    "cache_k": (lambda p, t: TOKEN + ["--teacher-cache", p.cache4, "--kd-topk", "8"],
                lambda p, t: ["--kd-topk 8 exceeds K=4", "--teacher-cache", p.cache4 + "/valid.topk.json"], False),
    "cache_split": (lambda p, t: TOKEN + ["--teacher-cache", p.test_cache, "--kd-topk", "4"],
                    lambda p, t: ["--teacher-cache", p.test_cache + "/valid.topk.json",
                                  "dumped for the 'test' split, not 'valid'"], False),
    "cache_dict": (lambda p, t: TOKEN + ["--teacher-cache", p.other_cache, "--kd-topk", "4"],
                   lambda p, t: ["--teacher-cache", p.other_cache + "/valid.topk.json", "another target dictionary"],
                   False),
    "cache_truncated": (lambda p, t: TOKEN + ["--teacher-cache", p.cut_cache, "--kd-topk", "4"],
                        lambda p, t: ["--teacher-cache", p.cut_cache + "/valid.topk.lprobs.f16", "(truncated)"],
                        False),
    "teacher_nan": (lambda p, t: TOKEN + ["--teacher-path", p.nan_teacher],
                    lambda p, t: ["teacher %s produced NaN/inf logits" % p.nan_teacher], True),
    "alpha": (lambda p, t: TOKEN + ["--teacher-path", t, "--kd-alpha", "1.5"],
              lambda p, t: ["--kd-alpha must be in [0, 1]; got 1.5"], False),
    "temperature": (lambda p, t: TOKEN + ["--teacher-path", t, "--kd-temperature", "0"],
                    lambda p, t: ["--kd-temperature must be in (0, inf]; got 0"], False),
    "topk_vocab": (lambda p, t: TOKEN + ["--teacher-path", t, "--kd-topk", "1000"],
                   lambda p, t: ["--kd-topk must be in [0, 48] (the target vocabulary); got 1000"], False),
    "divergence": (lambda p, t: TOKEN + ["--teacher-path", t, "--kd-divergence", "nosuch"],
                   lambda p, t: ["argument --kd-divergence: invalid choice: 'nosuch'"], False),
    "token_kd_no_teacher": (lambda p, t: TOKEN,
                            lambda p, t: ["criterion token_kd needs teacher logits", "--teacher-path",
                                          "--teacher-cache"], False),
    "sentence_kd_no_targets": (lambda p, t: ["--criterion", "sentence_kd"],
                               lambda p, t: ["criterion sentence_kd needs teacher-decoded targets",
                                             "--teacher-targets"], False),
    # the stock task serves no teacher signal: refused when the criterion is built
    "token_kd_stock_task": (lambda p, t: TOKEN + ["--task", "translation"],
                            lambda p, t: ["--criterion token_kd needs --task translation_kd",
                                          "got --task translation"], False),
}


# cases run as fresh fairseq-train processes (helpers.run), one per way of failing: at start-up, in argparse,
# in the first update; the others run in forks of one warm process (below), for speed
FRESH = ("teacher_missing", "divergence", "teacher_nan")

# fairseq-train's entry point in forks of a process that imported it once (the import and hydra's start-up
# are ~5 of the ~7 s a failing run takes on a loaded CI core); each fork is a whole fairseq-train run: its
# own argv, output, --user-dir import and exit status. argv: [[args, log], ...] in a JSON file; writes log.rc.
WARM_RUNNER = r"""
import json, os, sys, traceback
from fairseq_cli.train import cli_main
running = {}
def reap():
    pid, status = os.wait()
    with open(running.pop(pid) + ".rc", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
for args, log in json.load(open(sys.argv[1])):
    if len(running) == 2:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        sys.argv = ["fairseq-train"] + args
        try:
            cli_main(); code = 0
        except SystemExit as e:  # as the interpreter maps it
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = log
while running:
    reap()
"""


def train_args(data_bin, save_dir, flags):
    """fairseq-train's arguments: the toy student, 2 updates, logging every update, and the case's flags."""
    return [data_bin, "--save-dir", save_dir, *TINY_ARCH, *TRAIN_COMMON, "--max-update", "2", "--log-interval", "1",
            "--user-dir", USER_DIR, "--task", "translation_kd", *flags]


def warm_runs(jobs, job_file):
    """Run ``jobs`` ([args, log]) in forks of a warm fairseq-train; [(output, exit status)]."""
    with open(job_file, "w") as f:
        json.dump(jobs, f)
    run(sys.executable, "-c", WARM_RUNNER, job_file)
    out = []
    for _, log in jobs:
        with open(log) as f, open(log + ".rc") as rc:
            out.append((f.read(), int(rc.read())))
    return out


@pytest.fixture(scope="module")
def outcomes(inputs, data_bin, teacher):
    """Every case run once: {id: (output, exit status, save dir)}."""
    saves = {case: os.path.join(inputs.root, "save", case) for case in CASES}
    os.makedirs(os.path.join(inputs.root, "save"))
    args = {case: train_args(data_bin, saves[case], CASES[case][0](inputs, teacher)) for case in CASES}
    warm = [case for case in CASES if case not in FRESH]
    with ThreadPoolExecutor(1) as pool:  # fresh runs beside the warm runner's two forks
        fresh = pool.map(lambda case: run("fairseq-train", *args[case], expect_ok=False), FRESH)
        logs = warm_runs([[args[case], saves[case] + ".log"] for case in warm], os.path.join(inputs.root, "jobs.json"))
        result = {case: (log, rc) for case, (log, rc) in zip(warm, logs)}
        result.update((case, (log, 1)) for case, log in zip(FRESH, fresh))  # run() checked rc != 0
    return {case: result[case] + (saves[case],) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_clearly(case, outcomes, inputs, teacher):
    log, status, save = outcomes[case]
    assert status != 0, log[-3000:]
    errors = [m for m in map(ERROR_LINE.match, log.splitlines()) if m]
    assert len(errors) == 1, log[-3000:]
    message = errors[0].group(2)
    for fragment in CASES[case][1](inputs, teacher):
        assert fragment in message, (fragment, message)
    assert log.count(message) == 1
    # nothing written; a failure inside an update leaves fairseq's own crash dump of the student, crash.pt
    # (Trainer.train_step saves it on any exception), but no checkpoint to resume from
    in_update = CASES[case][2]
    written = sorted(f for f in os.listdir(save) if f.endswith(".pt")) if os.path.isdir(save) else []
    assert written == (["crash.pt"] if in_update else []), written
    assert "train_inner" not in log and "loss=nan" not in log and "| valid on" not in log


# every range-checked flag of the three criteria, with values just outside its range, NaN for the real ones
# (criterion, flag, bad value, extra flags the flag needs to take effect)
FLAG_CASES = [("token_kd", "--kd-alpha", v, ()) for v in ("-0.1", "1.5", "nan")]
FLAG_CASES += [("token_kd", "--kd-temperature", v, ()) for v in ("0", "-1", "nan")]
FLAG_CASES += [("token_kd", "--kd-js-beta", v, ()) for v in ("-0.1", "1.1", "nan")]
FLAG_CASES += [("token_kd", "--kd-skew-lambda", v, ()) for v in ("-0.1", "1.1", "nan")]
FLAG_CASES += [("token_kd", "--kd-topk", v, ()) for v in ("-1", "49")]  # the toy target vocabulary has 48 types
FLAG_CASES += [("token_kd", "--kd-select-rate", v, ("--kd-select", "batch")) for v in ("0", "1.5", "nan")]
FLAG_CASES += [("token_kd", "--kd-select-queue", v, ("--kd-select", "global")) for v in ("0", "-1")]
FLAG_CASES += [("sentence_kd", "--kd-gold-mix", v, ()) for v in ("-0.1", "1.1", "nan")]
FLAG_CASES += [("hybrid_kd", "--kd-alpha", "1.5", ()), ("hybrid_kd", "--kd-temperature", "0", ())]
FLAG_CASES += [("hybrid_kd", "--kd-gate-tau", v, ()) for v in ("0", "-1", "nan")]
FLAG_CASES += [("hybrid_kd", "--kd-gate-weight", v, ()) for v in ("-1", "nan")]
FLAG_CASES += [("hybrid_kd", "--kd-gate-momentum", v, ()) for v in ("-0.1", "1.1", "nan")]
FLAG_CASES += [("hybrid_kd", "--kd-gate-hidden", v, ()) for v in ("0", "-1")]
FLAG_CASES += [("hybrid_kd", "--kd-gate", v, ()) for v in ("nope", "fixed:1.5", "fixed:-0.5", "fixed:x", "fixed:nan",
                                                         "global+sentence")]
# retired gate values: refused naming the flag (and the commit that last had them, tests/test_retired.py)
FLAG_CASES += [("hybrid_kd", "--kd-gate", v, ()) for v in ("scalar", "global", "sentence+global", "sample:0.5")]


@pytest.mark.parametrize("criterion,flag,value,extra", FLAG_CASES,
                         ids=["%s%s=%s" % (c, f[4:], v) for c, f, v, _ in FLAG_CASES])
def test_criterion_flag_out_of_range_is_refused_naming_it(data_bin, criterion, flag, value, extra):
    """In-process (the criterion is built before the task looks for a teacher, so none is given): one
    KDConfigError, one line, naming the flag. A flag whose range is not checked fails here with another
    error (the missing teacher signal) or none."""
    from inproc import build

    from kd_plugin.checks import KDConfigError

    with pytest.raises(KDConfigError) as e:
        build(data_bin, "--task", "translation_kd", "--criterion", criterion, flag, value, *extra)
    message = str(e.value)
    assert flag in message and "\n" not in message, message
