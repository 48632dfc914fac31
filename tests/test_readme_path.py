"""README's recommended path, as written: the shell commands of "Distil your model" steps 1-3, read from README.md,
run on the toy corpus and teacher (DATA, teacher.pt, CACHE, DISTILL, $ARCH and N replaced, the student saved to
a temporary directory). The teacher's cache and distilled corpus are written, the student trains with the
hybrid, the schedule and the early stopping the README gives, keeps its best checkpoint by validation BLEU, and
stock fairseq-generate (no --user-dir) decodes it."""
import os
import re
import shlex

from helpers import TINY_ARCH, run

from test_docs import REPO

STEPS = ("**1. ", "**2. ", "**3. ")


def step_commands(text, step):
    """The commands of the first ```bash block after README's bold ``step`` (continuation lines joined)."""
    block = re.search(r"```bash\n(.*?)```", text[text.index(step):], re.S).group(1)
    return [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_steps_run_as_written(data_bin, teacher, tmp_path):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    text = text[text.index("## Distil your model"):]
    save = str(tmp_path / "checkpoints")
    names = {"DATA": data_bin, "teacher.pt": teacher, "CACHE": str(tmp_path / "cache"),
             "DISTILL": str(tmp_path / "distill"), "N": "30",
             "checkpoints/checkpoint_best.pt": os.path.join(save, "checkpoint_best.pt")}
    logs = []
    for step in STEPS:
        for cmd in step_commands(text, step):
            if cmd[0] == "kd-export":  # the export and its agreement check: tests/test_export.py
                continue
            args = []
            for a in cmd[1:]:
                args += TINY_ARCH if a == "$ARCH" else [names.get(a, a)]
            if cmd[0] == "fairseq-train":
                assert "--user-dir" in args and args[args.index("--user-dir") + 1] == "kd_plugin"
                args[args.index("--user-dir") + 1] = os.path.join(REPO, "kd_plugin")
                args += ["--save-dir", save, "--num-workers", "0", "--log-format", "simple"]
            if cmd[0] == "fairseq-generate":
                assert "--user-dir" not in args  # a student is a plain fairseq model
            logs.append((cmd[0], run(cmd[0], *args)))
    ran = [name for name, _ in logs]
    assert ran == ["kd-dump-teacher"] * 2 + ["kd-distill-corpus"] * 2 + ["fairseq-train", "fairseq-generate"]
    train_log = logs[4][1]
    assert "| gate 0.5 |" in train_log  # the hybrid at its fixed weight
    assert re.search(r"\| valid on 'valid' subset .*\| bleu [\d.]+", train_log)  # validation BLEU each epoch
    updates = [int(u) for u in re.findall(r"num_updates (\d+)", train_log)]
    assert updates and max(updates) <= int(names["N"])  # the budget N is the cap
    assert os.path.isfile(os.path.join(save, "checkpoint_best.pt"))
    assert sum(line.startswith("H-") for line in logs[5][1].splitlines()) == 100  # the toy test split
