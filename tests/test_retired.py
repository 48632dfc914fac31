"""Retired modes (kd_plugin.retired): a flag, a flag value or a checkpoint that asks for one fails with one
line naming it and the commit that last had it; nothing is written."""
import os
import subprocess

import pytest
import torch

from helpers import BIN, TINY_ARCH, TRAIN_COMMON, USER_DIR, kd_train, load_state
from kd_plugin.retired import LAST_COMMIT, ON_POLICY_COMMIT


@pytest.mark.parametrize("gate", ["scalar", "global", "sentence+global", "sample:0.5"])
def test_retired_gate_value_is_refused_naming_it_and_the_commit(data_bin, gate):
    from inproc import build

    from kd_plugin.checks import KDConfigError

    with pytest.raises(KDConfigError) as e:
        build(data_bin, "--task", "translation_kd", "--criterion", "hybrid_kd", "--kd-gate", gate)
    message = str(e.value)
    assert "--kd-gate %s was removed" % gate in message and LAST_COMMIT in message and "\n" not in message


def _fairseq_train(data_bin, save, *extra):
    cmd = [os.path.join(BIN, "fairseq-train"), data_bin, "--save-dir", save, *TINY_ARCH, *TRAIN_COMMON,
           "--user-dir", USER_DIR, "--task", "translation_kd", *[str(x) for x in extra]]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("argv,named", [(["--kd-mix", "word"], "--kd-mix"), (["--kd-mix-ramp=100"], "--kd-mix-ramp"),
                                        (["--kd-gold-weight", "0.5"], "--kd-gold-weight"),
                                        (["--kd-gate-global-rate", "0.1"], "--kd-gate-global-rate"),
                                        (["--kd-gate-warmup", "5"], "--kd-gate-warmup"),
                                        (["--kd-gate", "global"], "--kd-gate global"),
                                        (["--kd-gate=sample:0.5"], "--kd-gate sample:0.5")])
def test_every_retired_flag_is_named(argv, named):
    """kd_plugin.retired.check_argv, what the plugin runs on fairseq-train's command line (in-process)."""
    from kd_plugin.checks import KDConfigError
    from kd_plugin.retired import check_argv

    with pytest.raises(KDConfigError) as e:
        check_argv(["DATA", "--arch", "transformer"] + argv)
    assert str(e.value).startswith(named + " was removed") and LAST_COMMIT in str(e.value)
    check_argv(["DATA", "--kd-gate", "fixed:0.5", "--kd-alpha", "0.5"])  # today's flags pass


@pytest.mark.parametrize("argv,named", [(["--criterion", "on_policy_kd"], "--criterion on_policy_kd"),
                                        (["--criterion=on_policy_kd"], "--criterion on_policy_kd"),
                                        (["--on-policy-share", "0.5"], "--on-policy-share"),
                                        (["--on-policy-temperature=0"], "--on-policy-temperature"),
                                        (["--on-policy-max-len-a", "1.2"], "--on-policy-max-len-a"),
                                        (["--on-policy-max-len-b", "10"], "--on-policy-max-len-b")])
def test_on_policy_kd_is_named_with_its_own_commit_and_page(argv, named):
    """on_policy_kd left after the plateau's on-policy stage, later than the other modes: its message names its
    own commit and docs/ON_POLICY.md, and says what to use instead."""
    from kd_plugin.checks import KDConfigError
    from kd_plugin.retired import check_argv

    with pytest.raises(KDConfigError) as e:
        check_argv(["DATA", "--criterion", "token_kd"] + argv if argv[0] != "--criterion" else ["DATA"] + argv)
    message = str(e.value)
    assert message.startswith(named + " was removed from kd-plugin (last in commit %s, docs/ON_POLICY.md)"
                              % ON_POLICY_COMMIT), message
    assert "train with token_kd" in message and LAST_COMMIT not in message
    check_argv(["DATA", "--criterion", "token_kd", "--kd-topk", "8"])  # a criterion that stays passes


def test_on_policy_kd_on_fairseq_train_is_one_line_exit_2(data_bin, teacher, tmp_path):
    save = tmp_path / "ckpt"
    p = _fairseq_train(data_bin, save, "--criterion", "on_policy_kd", "--teacher-path", teacher,
                       "--on-policy-share", "0.5", "--max-update", "2")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: --criterion on_policy_kd was removed") and ON_POLICY_COMMIT in last
    assert "Traceback" not in p.stderr and not save.exists()


@pytest.mark.parametrize("flags", [("--kd-mix", "word"), ("--kd-gate", "global")])
def test_retired_flag_on_fairseq_train_is_one_line_exit_2(data_bin, teacher, teacher_targets, tmp_path, flags):
    save = tmp_path / "ckpt"
    p = _fairseq_train(data_bin, save, "--criterion", "hybrid_kd", "--teacher-path", teacher,
                       "--teacher-targets", teacher_targets, "--max-update", "2", *flags)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: %s" % flags[0].split("=")[0]) and LAST_COMMIT in last, last
    assert "Traceback" not in p.stderr and not save.exists()


def _retire(ckpt, out, **criterion):
    """A copy of checkpoint ``ckpt`` whose saved criterion configuration says ``criterion`` (as a checkpoint
    of commit LAST_COMMIT trained with a retired mode would)."""
    state = load_state(ckpt)
    for key, value in criterion.items():
        state["cfg"]["criterion"][key] = value
    torch.save(state, out)
    return out


@pytest.fixture(scope="module")
def hybrid_checkpoint(tmp_path_factory, data_bin, teacher, teacher_targets):
    save = str(tmp_path_factory.mktemp("hybrid_fixed"))
    kd_train(data_bin, save, "--criterion", "hybrid_kd", "--kd-gate", "fixed:0.5", "--teacher-path", teacher,
             "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", max_update=2)
    return os.path.join(save, "checkpoint_last.pt")


@pytest.mark.parametrize("retired,named", [({"kd_mix": "confidence"}, "--kd-mix confidence")])
def test_resuming_a_checkpoint_of_a_retired_mode_fails_naming_it(hybrid_checkpoint, data_bin, teacher,
                                                                 teacher_targets, tmp_path, retired, named):
    """fairseq-train --restore-file on such a checkpoint (with today's flags): one line, exit 2, no new file."""
    old = _retire(hybrid_checkpoint, str(tmp_path / "old.pt"), **retired)
    save = tmp_path / "resume"
    p = _fairseq_train(data_bin, save, "--criterion", "hybrid_kd", "--kd-gate", "fixed:0.5", "--teacher-path", teacher,
                       "--teacher-targets", teacher_targets, "--max-update", "4", "--restore-file", old)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-train: error: %s: %s was removed" % (old, named)) and LAST_COMMIT in last, last
    assert "Traceback" not in p.stderr
    assert not save.exists() or not [f for f in os.listdir(save) if f.endswith(".pt")]
    # the same checkpoint with today's configuration resumes (the refusal is the retired mode's, not the file's)
    ok = _fairseq_train(data_bin, tmp_path / "resume_ok", "--criterion", "hybrid_kd", "--kd-gate", "fixed:0.5",
                        "--teacher-path", teacher, "--teacher-targets", teacher_targets, "--max-update", "4",
                        "--restore-file", hybrid_checkpoint)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_checkpoint_trained_with_on_policy_kd_resumes_under_token_kd(hybrid_checkpoint, data_bin, teacher,
                                                                        tmp_path):
    """on_policy_kd kept no state: a checkpoint whose saved criterion is on_policy_kd (as one of commit
    ON_POLICY_COMMIT) is a stock model, and fairseq-train resumes it under token_kd (a new criterion: its
    optimizer reset, as fairseq requires)."""
    old, state = str(tmp_path / "old.pt"), load_state(hybrid_checkpoint)
    state["cfg"]["criterion"] = {"_name": "on_policy_kd", "on_policy_share": 0.5, "on_policy_temperature": 1.0,
                                 "kd_alpha": 0.5, "label_smoothing": 0.1}
    torch.save(state, old)
    p = _fairseq_train(data_bin, tmp_path / "resume", "--criterion", "token_kd", "--teacher-path", teacher,
                       "--label-smoothing", "0.1", "--max-update", "4", "--restore-file", old, "--reset-optimizer")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Loaded checkpoint %s" % old in p.stdout + p.stderr  # resumed, not trained from scratch
    assert os.path.isfile(tmp_path / "resume" / "checkpoint_last.pt")


def test_gate_dump_refuses_a_checkpoint_of_a_retired_mode(hybrid_checkpoint, data_bin, tmp_path):
    old = _retire(hybrid_checkpoint, str(tmp_path / "old.pt"), kd_gate="sentence+global")
    p = subprocess.run([os.path.join(BIN, "kd-gate-dump"), "--data", data_bin, "--path", old,
                        "--out", str(tmp_path / "gate.tsv")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1:] == ["kd-gate-dump: error: --path %s: --kd-gate sentence+global was removed from "
                                     "kd-plugin (last in commit %s, docs/MIX.md \"Retired modes\"): the learned gate "
                                     "plus the global controller, removed without a measured run: it was built on "
                                     "--kd-gate global, which ran to its bound" % (old, LAST_COMMIT)]
    assert not (tmp_path / "gate.tsv").exists()


@pytest.mark.parametrize("argv,prog,flag", [(["--targets", "DISTILL"], "kd-dump-teacher", "--targets"),
                                            (["merge", "--on-targets"], "kd-dump-teacher merge", "--on-targets")])
def test_kd_dump_teacher_retired_flag_is_one_line_exit_2(data_bin, teacher, tmp_path, capsys, argv, prog, flag):
    """The cache on teacher-decoded targets left with the --kd-mix rules (in-process): one line naming the flag,
    the commit and what to use instead (the gold targets, --teacher-targets), exit status 2, nothing written."""
    from kd_plugin.cli import dump_teacher

    out = tmp_path / "cache"
    rest = ["--out", out] if argv[0] == "merge" else ["--data", data_bin, "--path", teacher, "--out", out]
    with pytest.raises(SystemExit) as e:
        dump_teacher.cli_main(argv + [str(a) for a in rest])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("%s: error: %s was removed" % (prog, flag)), lines
    assert LAST_COMMIT in lines[0] and "gold targets" in lines[0] and "--teacher-targets" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("cfg,named", [({"kd_gate": "global", "kd_mix": "gate"}, "--kd-gate global"),
                                       ({"kd_gate": "fixed:0.5", "kd_gold_weight": 0.5}, "--kd-gold-weight 0.5"),
                                       ({"kd_gate": "sentence", "kd_gate_warmup": 100}, "--kd-gate-warmup 100")])
def test_saved_configuration_of_a_retired_mode_is_named(cfg, named):
    """kd_plugin.retired.check_criterion_cfg, what a resume and kd-gate-dump run on a checkpoint's criterion."""
    from kd_plugin.checks import KDConfigError
    from kd_plugin.retired import check_criterion_cfg

    with pytest.raises(KDConfigError) as e:
        check_criterion_cfg(cfg, "old.pt")
    assert str(e.value).startswith("old.pt: %s was removed" % named) and LAST_COMMIT in str(e.value)
    check_criterion_cfg({"kd_gate": "sentence", "kd_mix": "gate", "kd_gold_weight": 0.0, "kd_gate_warmup": 0},
                        "new.pt")  # an old checkpoint of a kept mode (the retired fields at their defaults) passes


def test_a_saved_task_configuration_with_its_seed_still_loads():
    """translation_kd keeps its ``seed`` field (it seeded on_policy_kd's rows): fairseq merges a saved task
    configuration into the task's dataclass and refuses a key the dataclass lacks (checked on the stock task)."""
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.tasks.translation import TranslationConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from kd_plugin.tasks.translation_kd import TranslationKDConfig

    saved = OmegaConf.create({"_name": "translation_kd", "data": "DATA", "seed": 3})
    assert merge_with_parent(TranslationKDConfig(), saved).data == "DATA"
    with pytest.raises(ConfigKeyError):  # what removing the field would do to such a checkpoint
        merge_with_parent(TranslationConfig(), OmegaConf.create({"_name": "translation", "data": "DATA", "seed": 3}))
