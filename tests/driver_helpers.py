"""Helpers the driver tests share (test_demo, test_configs, test_compare_mix, test_study, test_plateau): toy
fr-en corpora with optional dirty pairs, the QUICK-sized demo flags, and the checks that a driver's configurations
spell out every flag of their criterion's dataclass."""
import random

STUDENTS = ("plain", "token", "sentence", "hybrid")  # the demo's default students, in its order
# the QUICK column of demo.DEFAULTS, given explicitly: a full-mode run (the mode that may write docs/DEMO.md)
TINY = ["--teacher-layers", "1", "--teacher-dim", "64", "--teacher-ffn", "256", "--teacher-heads", "2",
        "--student-dim", "32", "--student-ffn", "64", "--teacher-epochs", "1", "--warmup", "50"]
MIS_SPLIT = " ".join("phrase%d coupée ici." % i for i in range(1380))[:17891]  # a mis-split line: 17,891 characters
# dirty pairs appended to the generated corpus: what cleaning drops them for
DIRTY = [("\tword1 word2", "empty"), (MIS_SPLIT + "\tword3 word4", "tokens"),
         ("x" * 1501 + "\tword5", "chars"), ("mot1\t" + " ".join(["word1"] * 10), "ratio"),
         ("same words\tsame words", "untranslated")]


def toy_pairs(n, seed=0):
    """n distinct toy fr<TAB>en lines: the English side maps mot<i> -> word<i>, word order kept."""
    rng = random.Random(seed)
    seen = {}  # insertion-ordered set
    while len(seen) < n:
        seen[tuple(rng.randrange(60) for _ in range(rng.randint(3, 9)))] = None
    return ["%s\t%s" % (" ".join("mot%d" % w for w in words), " ".join("word%d" % w for w in words))
            for words in seen]


def write_tsv(path, n=2000, seed=0, dirty=False):
    lines = toy_pairs(n, seed)
    if dirty:  # the dirty pairs, and a repeat of the first pair
        lines += [line for line, _ in DIRTY] + lines[:1]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return lines


def criterion_flags(criterion):
    """The flags that define a configuration of ``criterion``, from its registered dataclass: every field,
    less label_smoothed_cross_entropy's other than label_smoothing (sentence_avg, report_accuracy,
    ignore_prefix_size: fairseq's, never set by the drivers)."""
    import dataclasses

    import kd_plugin  # noqa: F401  (registers token_kd, sentence_kd, hybrid_kd)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY as registry

    fairseq_own = {f.name for f in dataclasses.fields(registry["label_smoothed_cross_entropy"])} - {"label_smoothing"}
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(registry[criterion])
            if f.name not in fairseq_own}


def flag_values(args):
    """{flag: value} of a fairseq-train argument list (value None for a flag followed by another flag); a flag
    given twice fails (the later one would silently win)."""
    args = [str(x) for x in args]
    out = {}
    for i, x in enumerate(args):
        if x.startswith("--"):
            assert x not in out, "%s given twice in %s" % (x, args)
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[x] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def check_configs(configs):
    """Every configuration of a driver ({name: fairseq-train flags}) gives every flag of its criterion's dataclass
    with a value, no --kd-* flag its criterion lacks (a retired one), and no two configurations are the same
    flags (in any order)."""
    seen = {}
    for name, args in configs.items():
        flags = flag_values(args)
        expected = criterion_flags(flags["--criterion"])
        assert expected <= flags.keys(), "%s: no %s" % (name, sorted(expected - flags.keys()))
        assert all(flags[f] is not None for f in expected), (name, flags)
        unknown = {f for f in flags if f.startswith("--kd-")} - expected
        assert not unknown, "%s: %s not flags of %s" % (name, sorted(unknown), flags["--criterion"])
        key = tuple(sorted(flags.items()))
        assert key not in seen, "%s and %s are the same configuration" % (seen.get(key), name)
        seen[key] = name
    return seen


def flags_of(table):
    """{name: fairseq-train arguments} of a table of kdexp.configs.Config."""
    return {name: config.flags() for name, config in table.items()}
