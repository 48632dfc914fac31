"""benchmarks/bench_data.py: a data step redone with another corpus (make bench, then make bench
BENCH_ARGS="--data-bin ...") leaves only the new corpus in work/bench/data-bin, not the old one beside it."""
import os
import shutil
import sys

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_data  # noqa: E402


def as_pair(source, out, src, tgt):
    """A copy of the src-tgt data-bin ``source`` renamed to the language pair src-tgt given."""
    os.makedirs(out)
    for name in os.listdir(source):
        new = name.replace("src-tgt", "%s-%s" % (src, tgt)).replace(".src.", ".%s." % src) \
            .replace(".tgt.", ".%s." % tgt)
        shutil.copy(os.path.join(source, name), os.path.join(out, new))


def test_a_redone_data_step_leaves_only_the_new_corpus(tmp_path):
    synthetic, de_en, out = str(tmp_path / "synthetic"), str(tmp_path / "de-en"), str(tmp_path / "data-bin")
    bench_data.synthetic_corpus(synthetic, 40, 30, 5, 1)
    as_pair(synthetic, de_en, "de", "en")
    bench_data.synthetic_corpus(out, 40, 30, 5, 1)
    assert bench_data.split_langs(out) == ("src", "tgt")
    bench_data.subset_data_bin(de_en, out, 20, 5, 1)
    assert sorted(os.listdir(out)) == files("de", "en")
    bench_data.synthetic_corpus(out, 40, 30, 5, 1)
    assert sorted(os.listdir(out)) == files("src", "tgt")


def files(src, tgt):
    """What a binarized corpus of the pair holds: dictionaries, train and valid splits."""
    return sorted(["dict.%s.txt" % src, "dict.%s.txt" % tgt] + [
        "%s.%s-%s.%s.%s" % (split, src, tgt, lang, ext) for split in ("train", "valid") for lang in (src, tgt)
        for ext in ("bin", "idx")])
