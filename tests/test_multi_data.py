"""DATA=a:b (fairseq trains epoch e on data directory (e-1) mod n): teacher directories follow the same rotation.

Two shards of equal size with different sentences: a single --teacher-targets directory would pass the count
check and silently pair shard b's sources with shard a's teacher outputs, so it is refused; one directory per
shard, colon-separated, serves each epoch the teacher outputs of its own shard.
"""
import os

import pytest
import torch

from helpers import USER_DIR, make_corpus, run
from inproc import build
from test_cli_errors import assert_one_line, fairseq

from kd_plugin.checks import KDConfigError

N = 1500  # the same size as data_bin's training split: the count check alone cannot tell the shards apart


@pytest.fixture(scope="module")
def shard_b(tmp_path_factory, data_bin, teacher):
    """A second binarized shard (other sentences, data_bin's dictionaries) and its teacher-decoded train split."""
    root = tmp_path_factory.mktemp("shard_b")
    make_corpus(str(root / "text"), n_train=N, n_valid=20, n_test=20, seed=7)
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", root / "text" / "train",
        "--validpref", root / "text" / "valid", "--srcdict", os.path.join(data_bin, "dict.src.txt"),
        "--tgtdict", os.path.join(data_bin, "dict.tgt.txt"), "--destdir", root / "bin", "--workers", "1")
    targets = str(root / "targets")
    run("kd-distill-corpus", "--data", root / "bin", "--path", teacher, "--split", "train", "--out", targets,
        "--beam", "1", "--max-tokens", "8000")
    return str(root / "bin"), targets


def test_one_teacher_directory_for_two_data_directories_is_refused(data_bin, shard_b, teacher_targets, tmp_path):
    data = data_bin + ":" + shard_b[0]
    with pytest.raises(KDConfigError, match="--teacher-targets: 1 directory for 2 data directories"):
        build(data, "--task", "translation_kd", "--criterion", "sentence_kd", "--teacher-targets", teacher_targets)
    rc, err = fairseq("fairseq-train", data, "--user-dir", USER_DIR, "--task", "translation_kd", "--criterion",
                      "sentence_kd", "--teacher-targets", teacher_targets, "--arch", "transformer", "--max-tokens", 1000,
                      "--save-dir", tmp_path)
    assert_one_line(rc, err, "fairseq-train", "--teacher-targets", "one teacher directory per data directory")


def test_each_epoch_reads_the_teacher_outputs_of_its_own_shard(data_bin, shard_b, teacher_targets):
    data, (bin_b, targets_b) = data_bin + ":" + shard_b[0], shard_b
    _, task, _, _ = build(data, "--task", "translation_kd", "--criterion", "sentence_kd",
                          "--teacher-targets", teacher_targets + ":" + targets_b)
    _, ref_a, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "sentence_kd",
                           "--teacher-targets", teacher_targets)
    _, ref_b, _, _ = build(bin_b, "--task", "translation_kd", "--criterion", "sentence_kd",
                           "--teacher-targets", targets_b)
    ref_a.load_dataset("train")
    ref_b.load_dataset("train")
    for epoch, ref in ((1, ref_a), (2, ref_b), (3, ref_a)):
        task.load_dataset("train", epoch=epoch)
        got, want = task.dataset("train"), ref.dataset("train")
        assert len(got) == len(want) == N
        for i in (0, 1, N // 2, N - 1):
            assert torch.equal(got[i]["source"], want[i]["source"])
            assert torch.equal(got[i]["teacher_target"], want[i]["teacher_target"])
    a0, b0 = ref_a.dataset("train")[0], ref_b.dataset("train")[0]
    assert not torch.equal(a0["source"], b0["source"])  # the shards really differ
