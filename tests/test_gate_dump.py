"""kd-gate-dump: the console-script contract (existing output refused without --overwrite, output renamed into
place only when complete, bad input = one line and exit 2) and Spearman's rho with tied ranks averaged."""
import math
import os
import subprocess

import numpy as np
import pytest
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

from helpers import BIN, kd_train
from kd_plugin.cli import gate_dump


def reference_spearman(x, y):
    """Float64 Spearman from the definition: rank_i = #{j: v_j < v_i} + (#{j: v_j == v_i} + 1) / 2, then Pearson."""
    def ranks(v):
        return [sum(w < u for w in v) + (sum(w == u for w in v) + 1) / 2.0 for u in v]

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def test_spearman_averages_tied_ranks():
    assert gate_dump.average_ranks([3, 1, 2, 2, 5, 1]).tolist() == [5, 1.5, 3.5, 3.5, 6, 1.5]
    # ranks (2, 2, 2, 4) and (3, 2, 1, 4): rho = 3 / sqrt(3 * 5); ranks broken by position would give 0.2
    assert gate_dump.spearman([1, 1, 1, 2], [3, 2, 1, 4]) == pytest.approx(3 / math.sqrt(15), abs=1e-15)
    rng = np.random.default_rng(0)
    for n in (3, 10, 200):
        x, y = rng.integers(0, 4, n), rng.integers(0, 3, n) + 0.5 * rng.random(n)  # many ties in x
        if len(set(x)) > 1:
            assert gate_dump.spearman(x, y) == pytest.approx(reference_spearman(x, y), abs=1e-12)
    assert math.isnan(gate_dump.spearman([1, 1, 1], [1, 2, 3]))  # constant column: undefined, not a number


@pytest.fixture(scope="module")
def student(tmp_path_factory, data_bin, teacher, teacher_targets):
    """A hybrid_kd student with a learned sentence gate, 3 updates."""
    save = str(tmp_path_factory.mktemp("hybrid"))
    kd_train(data_bin, save, "--criterion", "hybrid_kd", "--kd-gate", "sentence", "--teacher-path", teacher,
             "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", max_update=3)
    return os.path.join(save, "checkpoint_last.pt")


def dump(capsys, *args):
    """Run kd-gate-dump in-process: (exit status, stdout, stderr lines that are not log records)."""
    code = 0
    try:
        gate_dump.cli_main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if " | INFO | " not in line]


def read_tsv(path):
    lines = open(path).read().splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, map(float, line.split("\t")))) for line in lines[1:]]


def test_dump_spearman_overwrite_and_atomic_output(capsys, monkeypatch, data_bin, student, teacher, tmp_path):
    tsv, png = tmp_path / "gate.tsv", tmp_path / "gate.png"
    code, out, err = dump(capsys, "--data", data_bin, "--path", student, "--split", "valid", "--out", tsv,
                          "--plot", png, "--teacher-path", teacher)
    assert code == 0, err
    header, rows = read_tsv(tsv)
    assert header == ["id", "gate", "src_len", "tgt_len", "teacher_entropy", "disagreement", "student_nll"]
    assert [r["id"] for r in rows] == list(range(100))
    gates = [r["gate"] for r in rows]
    for col in header[2:]:  # lengths tie a lot: the printed rho averages tied ranks
        printed = out.split("spearman(gate, %s) = " % col)[1].split()[0]
        ref = reference_spearman(gates, [r[col] for r in rows])
        # printed with %+.3f, so up to half a unit (5e-4) from the exact rho (measured 4.9e-4 for one column): a
        # tolerance of 5e-4 has no margin, so compare with the reference rounded the same way; only a reference
        # within 1e-9 of a rounding tie may round either way (gate_dump.spearman agrees with it to 1e-12, above)
        assert printed in {"%+.3f" % (ref - 1e-9), "%+.3f" % (ref + 1e-9)}, (col, printed, ref)
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(os.listdir(tmp_path)) == ["gate.png", "gate.tsv"]

    before = tsv.read_bytes()
    code, _, err = dump(capsys, "--data", data_bin, "--path", student, "--out", tsv)
    assert code == 2 and err == ["kd-gate-dump: error: --out: %s already exists (pass --overwrite to replace it)"
                                 % tsv]
    assert tsv.read_bytes() == before
    code, _, err = dump(capsys, "--data", data_bin, "--path", student, "--out", tmp_path / "new.tsv", "--plot", png)
    assert code == 2 and err[0].startswith("kd-gate-dump: error: --plot: ") and not (tmp_path / "new.tsv").exists()

    # a failure while writing leaves neither file nor any temporary
    def broken_plot(rows, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gate_dump, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        gate_dump.cli_main(["--data", data_bin, "--path", student, "--out", str(tmp_path / "b.tsv"),
                            "--plot", str(tmp_path / "b.png")])
    assert sorted(os.listdir(tmp_path)) == ["gate.png", "gate.tsv"]
    monkeypatch.undo()

    code, _, err = dump(capsys, "--data", data_bin, "--path", student, "--split", "test", "--out", tsv, "--overwrite")
    assert code == 0, err
    header, rows = read_tsv(tsv)
    assert len(header) == 4 and rows[-1]["id"] == 99 and tsv.read_bytes() != before  # the test split's rows
    assert sorted(os.listdir(tmp_path)) == ["gate.png", "gate.tsv"]


def empty_split(data_bin, root):
    """A copy of ``data_bin`` (symlinks) with a split ``empty`` of zero sentences, binarized like fairseq's."""
    os.makedirs(root)
    for name in os.listdir(data_bin):
        os.symlink(os.path.join(data_bin, name), os.path.join(root, name))
    for lang in ("src", "tgt"):
        prefix = os.path.join(root, "empty.src-tgt.%s" % lang)
        MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    return root


@pytest.mark.parametrize("case", ["data", "path", "split", "no-gate", "empty"])
def test_bad_input_is_one_line_and_exit_2(capsys, data_bin, student, teacher, tmp_path, case):
    args = {"--data": data_bin, "--path": student, "--split": "valid"}
    expected = {
        "data": ("--data", str(tmp_path / "absent"), "--data: not a directory: %s" % (tmp_path / "absent")),
        "path": ("--path", str(tmp_path / "absent.pt"), "--path: checkpoint not found: %s" % (tmp_path / "absent.pt")),
        "split": ("--split", "tset", "--split: no tset split in %s" % data_bin),
        "no-gate": ("--path", teacher, "--path: %s holds no learned gate" % teacher),
        "empty": ("--data", str(tmp_path / "bin"), "--split: the empty split of %s is empty" % (tmp_path / "bin")),
    }[case]
    if case == "empty":
        empty_split(data_bin, str(tmp_path / "bin"))
        args["--split"] = "empty"
    args[expected[0]] = expected[1]
    code, _, err = dump(capsys, *[x for kv in args.items() for x in kv], "--out", tmp_path / "gate.tsv")
    assert code == 2 and len(err) == 1 and err[0].startswith("kd-gate-dump: error: " + expected[2]), err
    assert not (tmp_path / "gate.tsv").exists()


def test_console_script_exit_status(tmp_path, data_bin):
    """The installed kd-gate-dump: one line on stderr, no traceback, exit 2."""
    p = subprocess.run([os.path.join(BIN, "kd-gate-dump"), "--data", data_bin, "--path", str(tmp_path / "absent.pt"),
                        "--out", str(tmp_path / "g.tsv")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["kd-gate-dump: error: --path: checkpoint not found: %s" % (tmp_path / "absent.pt")]
