"""kd-distill-corpus from-text: translations from outside fairseq become the same corpus the fairseq engine
writes (checked byte for byte), plain text through the student's sentencepiece model binarizes exactly as
fairseq-preprocess does, the task serves it, and bad files are one line, exit 2, nothing written."""
import filecmp
import os
import subprocess

import pytest

from helpers import BIN, run
from inproc import build, first_batch

PREFIX = "valid.src-tgt.tgt"


def from_text(*args):
    p = subprocess.run([os.path.join(BIN, "kd-distill-corpus"), "from-text", *map(str, args)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p.returncode, p.stderr


def test_pieces_text_reproduces_the_fairseq_engine_output(data_bin, teacher_targets, tmp_path):
    """The fairseq engine's own .txt (the teacher's hypotheses as dictionary pieces) fed back as --text:
    .bin and .idx byte-identical to the engine's, .txt identical; the .json names the text and its sha256."""
    text = os.path.join(teacher_targets, PREFIX + ".txt")
    out = tmp_path / "from_text"
    code, err = from_text("--data", data_bin, "--split", "valid", "--text", text, "--out", out)
    assert code == 0, err[-2000:]
    for suffix in (".bin", ".idx", ".txt"):
        assert filecmp.cmp(out / (PREFIX + suffix), os.path.join(teacher_targets, PREFIX + suffix), shallow=False)
    import json

    meta = json.loads((out / (PREFIX + ".json")).read_text())
    assert meta["origin"]["kind"] == "text" and meta["origin"]["path"] == os.path.abspath(text)
    assert len(meta["origin"]["sha256"]) == 64 and meta["count"] == meta["split_size"] == 100


def test_plain_text_with_spm_binarizes_like_fairseq_preprocess(data_bin, tmp_path):
    """A sentencepiece data-bin of the toy corpus; the valid split's plain (detokenized) gold text with --spm
    gives exactly fairseq-preprocess's binarized targets, and translation_kd serves them as teacher targets."""
    import sentencepiece as spm
    import torch

    text = os.path.join(os.path.dirname(data_bin), "text")
    spm.SentencePieceTrainer.train(input=[os.path.join(text, "train.src"), os.path.join(text, "train.tgt")],
                                   model_prefix=str(tmp_path / "spm"), vocab_size=60, hard_vocab_limit=False, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("src", "tgt"):
            with open(os.path.join(text, "%s.%s" % (split, lang)), encoding="utf-8") as f:
                lines = f.read().splitlines()
            (pieces / ("%s.%s" % (split, lang))).write_text("\n".join(" ".join(p) for p in sp.encode(lines, out_type=str)) + "\n")
    spm_bin = tmp_path / "bin"
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--trainpref", pieces / "train", "--validpref", pieces / "valid", "--testpref", pieces / "test",
        "--destdir", spm_bin, "--workers", "1")
    out = tmp_path / "from_text"
    code, err = from_text("--data", spm_bin, "--split", "valid", "--text", os.path.join(text, "valid.tgt"),
                          "--spm", tmp_path / "spm.model", "--out", out)
    assert code == 0, err[-2000:]
    assert filecmp.cmp(out / (PREFIX + ".bin"), spm_bin / (PREFIX + ".bin"), shallow=False)
    assert filecmp.cmp(out / (PREFIX + ".idx"), spm_bin / (PREFIX + ".idx"), shallow=False)

    _, task, _, _ = build(str(spm_bin), "--task", "translation_kd", "--criterion", "sentence_kd",
                          "--teacher-targets", str(out), "--kd-gold-mix", "0", "--label-smoothing", "0.1")
    sample = first_batch(task)
    assert sample["teacher_target"].shape == sample["target"].shape
    assert torch.equal(sample["teacher_target"], sample["target"])  # the gold text, binarized twice alike


def _bad_file(tmp_path, kind, n):
    path = tmp_path / ("%s.txt" % kind)
    lines = ["w%d b%d" % (i, i) for i in range(n)]
    if kind == "count":
        lines = lines[:-1]
    if kind == "empty":
        for i in range(0, n, 10):  # 10% empty
            lines[i] = ""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if kind == "encoding":
        data = data.replace(b"w2 b2", b"w2 b\xe42")  # latin-1 "ä" on line 3
    if kind != "missing":
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind,expected", [
    ("count", "has 99 lines but the split has 100 sentences"),
    ("encoding", "line 3 is not UTF-8 (byte 0xe4 at column 5)"),
    ("empty", "has 10 empty lines (10.0% of 100), more than --max-empty-share 0.01"),
    ("missing", "not found"),
])
def test_bad_text_is_one_line_exit_2_nothing_written(data_bin, tmp_path, kind, expected):
    path = _bad_file(tmp_path, kind, 100)
    out = tmp_path / "out"
    code, err = from_text("--data", data_bin, "--split", "valid", "--text", path, "--out", out)
    lines = [x for x in err.strip().splitlines() if " | INFO | " not in x]
    assert code == 2 and lines[-1].startswith("kd-distill-corpus from-text: error: --text: %s %s" % (path, expected)), err
    assert "Traceback" not in err
    assert not out.exists() or not os.listdir(out)
