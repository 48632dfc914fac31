"""The demo beside the plateau study (issue 28). ``plateau_line``: how far a demo run is from the plateau, its
teacher's and students' test BLEU beside the same architecture and method trained to convergence (the records
of docs/plateau_results.json, reported in docs/PLATEAU.md); comparable only for a full run on the default
corpus with the plateau study's architectures (the records' commands name them), else the line says why not.
``--plateau-teacher``: the demo distils the recorded plateau teacher instead of training one (checked against
the run's teacher architecture before anything is written, and against its dictionary once the data steps
made it)."""
import json
import os
import shutil
import statistics

from kdexp import plateau, recipes
from kdexp.options import DEFAULTS
from kdexp.pipeline import REPO, sha256, write_lines

LINK = "docs/PLATEAU.md"


class PlateauTeacherError(ValueError):
    """--plateau-teacher cannot be used: the one-line reason."""


def arch_flags(cmd):
    """{flag: value} of the architecture flags in a fairseq-train command (order-free)."""
    cmd = [str(x) for x in cmd]
    keys = [f for side in recipes.SIDES for f in ("--%s-layers" % side, "--%s-embed-dim" % side,
                                                   "--%s-ffn-embed-dim" % side, "--%s-attention-heads" % side)]
    return {f: cmd[cmd.index(f) + 1] for f in keys if f in cmd[:-1]}


def teacher_record(path):
    """The teacher record of a records file (docs/plateau_results.json: a list) or of a single record
    (plateau_teacher.py --quick writes WORK/teacher.json)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PlateauTeacherError("--plateau-teacher: cannot read %s (%s)" % (path, e))
    found = [r for r in (data if isinstance(data, list) else [data])
             if isinstance(r, dict) and r.get("method") == "teacher"]
    keys = ("checkpoint", "teacher_sha256", "dictionary_sha256", "command", "test_bleu", "best_epoch", "epochs",
            "curve")
    if not found or any(k not in found[0] for k in keys):
        raise PlateauTeacherError("--plateau-teacher: %s has no teacher record with %s" % (path, ", ".join(keys)))
    return found[0]


def check_plateau_teacher(a):
    """Before anything is written: the record of ``a.plateau_teacher``, its checkpoint (present, the recorded
    sha256) and its architecture (the run's --teacher-*); returns the record."""
    r = teacher_record(a.plateau_teacher)
    ckpt = os.path.join(REPO, r["checkpoint"])
    if not os.path.isfile(ckpt) or sha256(ckpt) != r["teacher_sha256"]:
        raise PlateauTeacherError("--plateau-teacher: %s is missing or not the recorded teacher (sha256 %s)"
                                  % (ckpt, r["teacher_sha256"]))
    if arch_flags(r["command"]) != arch_flags(recipes.model_args(a, "teacher")):
        raise PlateauTeacherError("--plateau-teacher: its architecture %s is not this run's teacher's %s "
                                  "(--teacher-*)" % (arch_flags(r["command"]),
                                                     arch_flags(recipes.model_args(a, "teacher"))))
    if os.path.isfile(os.path.join(a.work, "done", "train-teacher.json")):
        raise PlateauTeacherError("--plateau-teacher: %s holds another run's teacher; pass another --work" % a.work)
    return r


def install_plateau_teacher(p, record):
    """The recorded teacher as this run's teacher (step train-teacher, nothing trained), once the data steps
    made the dictionary it must share; its log notes the updates it was trained for (the report's column)."""
    dictionary = p.path("data-bin", "dict.%s.txt" % p.args.tgt_lang)
    if sha256(dictionary) != record["dictionary_sha256"]:
        raise PlateauTeacherError("--plateau-teacher: %s is not the dictionary the teacher was trained with "
                                  "(sha256 %s): another corpus, split or BPE"
                                  % (dictionary, record["dictionary_sha256"]))
    best = next(c for c in record["curve"] if c["epoch"] == record["best_epoch"])

    def install():
        os.makedirs(os.path.dirname(recipes.checkpoint(p, "teacher")), exist_ok=True)
        shutil.copy(os.path.join(REPO, record["checkpoint"]), recipes.checkpoint(p, "teacher"))
        write_lines(p.path("logs", "train-teacher.log"), [
            "--plateau-teacher: %s (sha256 %s), not trained by this run" % (record["checkpoint"],
                                                                              record["teacher_sha256"]),
            "its best epoch %d of %d: num_updates %d" % (record["best_epoch"], record["epochs"], best["updates"])])
    p.step("train-teacher", install, ["plateau-teacher", record["teacher_sha256"]])


def _why_not(a):
    if a.quick:
        return "a QUICK smoke run"
    if a.data:
        return "another corpus (--data)"
    sizes = [k for k in ("train_pairs", "valid_pairs", "test_pairs", "bpe_size") if getattr(a, k) != DEFAULTS[k][0]]
    if sizes:
        return "other data sizes: %s" % ", ".join("--" + k.replace("_", "-") for k in sizes)
    return None


def plateau_line(a, results, records=None):
    """One markdown line: each system's test BLEU (beam 5) here against the same architecture and method at
    its plateau (mean over the recorded seeds), or why this run is not comparable."""
    head = "- Distance to the plateau (%s: the same corpus and architectures trained to convergence): " % LINK
    why = _why_not(a)
    if why:
        return head + "not comparable (%s)" % why
    records = plateau.load_records() if records is None else records
    teacher = next((r for r in records if r["method"] == "teacher" and not r.get("quick")), None)
    if teacher is None:
        return head + "no plateau teacher recorded yet"
    if arch_flags(teacher["command"]) != arch_flags(recipes.model_args(a, "teacher")):
        return head + "not comparable (another teacher architecture than the plateau teacher's)"
    bleu = results["teacher"]["bleu"]
    if a.plateau_teacher:
        here = "the plateau teacher itself (--plateau-teacher), %.1f BLEU here" % bleu
    else:
        here = "teacher %.1f BLEU here (%s epochs)" % (bleu, a.teacher_epochs)
    parts = [here + " vs %.1f at its plateau (best epoch %d of %d)" % (
        teacher["test_bleu"], teacher["best_epoch"], teacher["epochs"])]
    student = arch_flags(recipes.model_args(a, "student"))
    for name, r in results.items():
        if name == "teacher":
            continue
        runs = [x for x in records if x["method"] == name and not x.get("quick") and "test_bleu" in x
                and arch_flags(x["command"]) == student]
        if not runs:
            parts.append("%s %.1f here, no plateau run yet" % (name, r["bleu"]))
            continue
        bleu = [x["test_bleu"] for x in runs]
        parts.append("%s %.1f here vs %.1f at its plateau (%s; best epochs %s)" % (
            name, r["bleu"], statistics.mean(bleu), "%d seeds" % len(runs) if len(runs) > 1 else "1 seed",
            "/".join(str(x["best_epoch"]) for x in sorted(runs, key=lambda x: x["seed"]))))
    return head + "; ".join(parts) + " (students here: %s epochs)" % a.student_epochs
