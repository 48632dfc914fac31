"""The demo's command line, shared by every driver that runs the demo's pipeline (demo, compare_mix, study,
distill_engines, plateau_teacher): corpus, languages, cleaning, sizes of the teacher and the students,
optimizer, parallelism, work directory. Every size has a (full, quick) default (DEFAULTS)."""
import argparse
import os
import re
import sys

from kdexp import corpus as build_corpus
from kdexp.configs import DEFAULT_STUDENTS, STUDENTS
from kdexp.pipeline import REPO
from kdexp.recipes import DISTILL_ENGINES, SIDES

PLATEAU_RECORDS = os.path.join(REPO, "docs", "plateau_results.json")

LANG_RE = re.compile(r"^[A-Za-z0-9_]+$")  # fairseq names files {split}.{src}-{tgt}.{lang}
# Default sizes: (full, quick); 0 pairs = the whole split. Their measured cost (train time of each system, the
# distillation, the run's wall time, with the command and the machine): docs/DEMO.md.
DEFAULTS = {
    "bpe_size": (4000, 1000),
    "teacher_layers": (2, 1), "teacher_dim": (128, 64), "teacher_ffn": (512, 256), "teacher_heads": (4, 2),
    "student_layers": (1, 1), "student_dim": (64, 32), "student_ffn": (256, 64), "student_heads": (2, 2),
    "teacher_epochs": (3, 1), "student_epochs": (2, 1), "warmup": (400, 50), "distill_beam": (2, 2),
    "train_pairs": (0, 3000), "valid_pairs": (0, 200), "test_pairs": (0, 200), "speed_reps": (2, 1),
}
HELP = {"speed_reps": "rounds of the speed phase (kdexp/speed.py: interleaved, the median is reported)"}


def parse_args(argv=None, description=None):
    """The demo's flags (``description``: the driver's one-line summary) as a namespace; a bad flag is
    argparse's one-line error, exit status 2."""
    quick = bool(os.environ.get("QUICK")) or "--quick" in (argv if argv is not None else sys.argv[1:])
    column = 1 if quick else 0
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=quick,
                        help="smoke run (also QUICK=1): 3k-pair subset, tiny models, scores meaningless")
    parser.add_argument("--work", help="work directory (default: work/demo, work/demo-quick with --quick; with "
                                       "--data: work/demo[-quick]-NAME-SRC-TGT for NAME.tsv)")
    parser.add_argument("--data", default=os.environ.get("DATA") or None,
                        help="SRC<TAB>TGT corpus to use instead of the LibreOffice help (also DATA=file.tsv)")
    parser.add_argument("--src-lang", default="de", help="language code of the --data TSV's first column")
    parser.add_argument("--tgt-lang", default="en", help="language code of the --data TSV's second column")
    build_corpus.add_clean_args(parser)
    parser.add_argument("--cache", default=os.path.join(REPO, "work", "cache"),
                        help="download cache of examples/build_corpus.py")
    parser.add_argument("--students", default=",".join(DEFAULT_STUDENTS),
                        help="comma-separated, from %s" % list(STUDENTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--distill-shards", type=int, default=min(len(os.sched_getaffinity(0)), 8),
                        help="parallel single-threaded kd-distill-corpus processes")
    parser.add_argument("--distill-engine", choices=list(DISTILL_ENGINES), default="ctranslate2",
                        help="kd-distill-corpus --engine (ctranslate2: float32 conversion of the teacher)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of training/decoding (0: torch's default for the teacher and "
                             "decoding, cores / --jobs for each student; 1 on a busy machine)")
    parser.add_argument("--jobs", type=int, default=min(len(os.sched_getaffinity(0)), 4),
                        help="students trained (and scored) at the same time")
    parser.add_argument("--max-update", type=int, default=0, help="stop every training here too (0: epochs only)")
    parser.add_argument("--plateau-teacher", nargs="?", const=PLATEAU_RECORDS, default=None, metavar="RECORDS",
                        help="distil the plateau study's teacher instead of training one: the teacher record of "
                             "RECORDS (default docs/plateau_results.json: artifacts/plateau/teacher.pt, trained "
                             "to convergence on the default corpus); work directory default gets -plateau-teacher")
    for key, values in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=values[column], help=HELP.get(key))
    for role in ("teacher", "student"):
        for side in SIDES:
            for k in ("layers", "ffn"):
                parser.add_argument("--%s-%s-%s" % (role, side, k), type=int, default=None,
                                    help="default: --%s-%s" % (role, k))
    a = parser.parse_args(argv)
    for flag, lang in (("--src-lang", a.src_lang), ("--tgt-lang", a.tgt_lang)):
        if not LANG_RE.match(lang):
            parser.error("%s: %r is not a language code (letters, digits, _)" % (flag, lang))
    if a.src_lang == a.tgt_lang:
        parser.error("--src-lang and --tgt-lang are both %r" % a.src_lang)
    if not a.data and (a.src_lang, a.tgt_lang) != build_corpus.LANGS:
        parser.error("--src-lang/--tgt-lang: the default corpus is de-en; pass --data FILE.tsv for %s-%s"
                     % (a.src_lang, a.tgt_lang))
    a.clean_limits = build_corpus.clean_limits(parser, a)
    if a.work is None:
        name = "demo-quick" if quick else "demo"
        if a.data:
            stem = re.sub(r"[^\w.-]+", "_", os.path.splitext(os.path.basename(a.data))[0])
            name = "%s-%s-%s-%s" % (name, stem, a.src_lang, a.tgt_lang)
        a.work = os.path.join(REPO, "work", name + ("-plateau-teacher" if a.plateau_teacher else ""))
    a.work, a.cache = os.path.abspath(a.work), os.path.abspath(a.cache)
    a.data = a.data and os.path.abspath(a.data)
    a.students = [s for s in a.students.split(",") if s]
    unknown = [s for s in a.students if s not in STUDENTS]
    if unknown:
        parser.error("--students: unknown %s (choose from %s)" % (unknown, ", ".join(STUDENTS)))
    if a.jobs < 1:
        parser.error("--jobs must be >= 1 (got %d)" % a.jobs)
    if a.speed_reps < 1:
        parser.error("--speed-reps must be >= 1 (got %d)" % a.speed_reps)
    return a
