"""Shared test utilities: a generated toy corpus and thin wrappers around the real fairseq CLIs."""
import os
import random
import subprocess
import sys

import torch
from kdexp import warm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "kd_plugin")
BIN = os.path.dirname(sys.executable)

# a tiny model that still learns the toy task in ~100 updates on one CPU core
TINY_ARCH = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
             "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
             "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
TRAIN_COMMON = ["--optimizer", "adam", "--lr", "5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
                "--max-tokens", "1000", "--seed", "1", "--no-progress-bar", "--log-format", "simple",
                "--log-interval", "10", "--num-workers", "0", "--no-epoch-checkpoints", "--dropout", "0.1",
                "--validate-interval-updates", "0"]


def make_corpus(out_dir, n_train=1500, n_valid=100, n_test=100, seed=0):
    """Toy de->en-like task: target = source reversed, each word mapped a<i> -> b<i>, with variants.

    Word b<i> is sometimes followed by c<i> (probability 0.3), so the teacher has a real distribution.
    """
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        src_lines, tgt_lines = [], []
        for _ in range(n):
            words = [rng.randrange(20) for _ in range(rng.randint(3, 9))]
            tgt = []
            for w in reversed(words):
                tgt.append("b%d" % w)
                if rng.random() < 0.3:
                    tgt.append("c%d" % w)
            src_lines.append(" ".join("a%d" % w for w in words))
            tgt_lines.append(" ".join(tgt))
        for lang, lines in (("src", src_lines), ("tgt", tgt_lines)):
            with open(os.path.join(out_dir, "%s.%s" % (split, lang)), "w") as f:
                f.write("\n".join(lines) + "\n")


def run(*args, expect_ok=True, env=None, timeout=600):
    """Run a CLI (name resolved next to this interpreter) and return its combined output. fairseq's and
    kd-plugin's console scripts run in a fork of a warm process (examples/kdexp/warm.py) unless ``env`` changes the
    environment (e.g. PYTHONPATH) or KD_TESTS_COLD=1."""
    cmd = [os.path.join(BIN, args[0]) if os.path.exists(os.path.join(BIN, args[0])) else args[0]]
    cmd += [str(a) for a in args[1:]]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    if env is None and args[0] in warm.ENTRIES and cmd[0] != args[0] and os.environ.get("KD_TESTS_COLD") != "1":
        code, out = warm.run(args[0], cmd[1:], full_env, timeout)
    else:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                           timeout=timeout)
        code, out = p.returncode, p.stdout
    if expect_ok and code != 0:
        raise AssertionError("command failed (%d): %s\n%s" % (code, " ".join(cmd), out[-4000:]))
    if not expect_ok and code == 0:
        raise AssertionError("command unexpectedly succeeded: %s\n%s" % (" ".join(cmd), out[-2000:]))
    return out


def driver_env():
    """The environment of an examples/ driver run by a test: its console scripts in forks of a warm process
    (KDEXP_WARM=1, kdexp.pipeline) unless KD_TESTS_COLD=1."""
    return dict(os.environ, KDEXP_WARM="0" if os.environ.get("KD_TESTS_COLD") == "1" else "1")


def preprocess(text_dir, dest):
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", os.path.join(text_dir, "train"), "--validpref", os.path.join(text_dir, "valid"),
        "--testpref", os.path.join(text_dir, "test"), "--destdir", dest, "--workers", "1")


def train(data, save_dir, *extra, arch=TINY_ARCH, max_update=100):
    """fairseq-train with the toy settings; returns the log."""
    return run("fairseq-train", data, "--save-dir", save_dir, *arch, *TRAIN_COMMON,
               "--max-update", max_update, *extra)


def kd_train(data, save_dir, *extra, **kw):
    return train(data, save_dir, "--user-dir", USER_DIR, "--task", "translation_kd", *extra, **kw)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def last_valid(log, key="loss"):
    """The last validation value of ``key`` in a fairseq simple-format log."""
    vals = [line.split("| %s " % key)[1].split()[0] for line in log.splitlines()
            if "| valid on" in line and ("| %s " % key) in line]
    assert vals, "no validation line with %r in log:\n%s" % (key, log[-3000:])
    return float(vals[-1])
