"""Bad input inside fairseq's own command lines (loaded with --user-dir) is one line and exit status 2."""
import os
import subprocess

import pytest

from helpers import BIN, TINY_ARCH, TRAIN_COMMON, USER_DIR


def fairseq(cmd, *args):
    p = subprocess.run([os.path.join(BIN, cmd), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    return p.returncode, p.stderr.strip().splitlines()


def assert_one_line(rc, err, prog, *words):
    assert rc == 2, err
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith(prog + ": error: ") and all(w in last for w in words), err[-5:]


@pytest.mark.parametrize("criterion", ["token_kd", "sentence_kd", "hybrid_kd"])
def test_kd_criterion_under_the_stock_task_is_refused_at_start_up(data_bin, criterion, tmp_path):
    rc, err = fairseq("fairseq-train", data_bin, "--user-dir", USER_DIR, "--criterion", criterion, *TINY_ARCH,
                      *TRAIN_COMMON, "--max-update", 1, "--save-dir", tmp_path / "ckpt")
    assert_one_line(rc, err, "fairseq-train", "--criterion " + criterion, "--task translation_kd")
    assert not os.path.exists(tmp_path / "ckpt" / "crash.pt") and not any("num_updates" in e for e in err)


def test_config_error_in_fairseq_generate_is_one_line(data_bin, teacher, tmp_path):
    rc, err = fairseq("fairseq-generate", data_bin, "--user-dir", USER_DIR, "--task", "translation_kd",
                      "--teacher-targets", tmp_path / "missing", "--path", teacher, "--gen-subset", "test")
    assert_one_line(rc, err, "fairseq-generate", "--teacher-targets", "test split")
