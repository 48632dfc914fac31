"""Session fixtures: a generated toy corpus, binarized, and small teachers trained with stock fairseq."""
import os

import pytest

from helpers import TINY_ARCH, make_corpus, preprocess, train

# a teacher twice the student's width and depth
TEACHER_ARCH = [a if a not in ("32", "64", "1") else {"32": "64", "64": "128", "1": "2"}[a] for a in TINY_ARCH]


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(str(root / "text"))
    preprocess(str(root / "text"), str(root / "bin"))
    return str(root / "bin")


def _teacher(tmp_path_factory, data_bin, seed):
    save = tmp_path_factory.mktemp("teacher%d" % seed)
    train(data_bin, str(save), "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
          "--seed", str(seed), arch=TEACHER_ARCH, max_update=300)
    return os.path.join(str(save), "checkpoint_last.pt")


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, data_bin):
    return _teacher(tmp_path_factory, data_bin, 1)


@pytest.fixture(scope="session")
def teacher2(tmp_path_factory, data_bin):
    return _teacher(tmp_path_factory, data_bin, 2)


@pytest.fixture(scope="session")
def teacher_targets(tmp_path_factory, data_bin, teacher):
    """Teacher-decoded train and valid targets (kd-distill-corpus, beam 4) in one directory."""
    from helpers import run

    out = str(tmp_path_factory.mktemp("distill") / "targets")
    for split in ("train", "valid"):
        run("kd-distill-corpus", "--data", data_bin, "--path", teacher, "--split", split, "--out", out,
            "--beam", "4", "--max-tokens", "4000")
    return out
