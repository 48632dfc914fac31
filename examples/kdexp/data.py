"""The demo's data steps: corpus (kdexp/corpus.py, cleaned and split, subsampled on request),
joint sentencepiece BPE, and the fairseq-preprocess command. Languages are ``args.src_lang``/``args.tgt_lang``.
"""
import os

from kdexp import corpus as build_corpus
from kdexp.pipeline import StepFailed, read_lines, tool, write_lines

SPLITS = ("train", "valid", "test")
# fairseq's transformer takes 1024 positions (--max-source/target-positions), one of them the end of sentence
MAX_PIECES = 1023


def langs(a):
    return a.src_lang, a.tgt_lang


def limits(a):
    """{split: --{split}-pairs} (0 = the whole split)."""
    return {"train": a.train_pairs, "valid": a.valid_pairs, "test": a.test_pairs}


def full_corpus_dir(p):
    """Where build_corpus writes the whole split (and its cleaning.json): WORK/corpus-full when subsampled."""
    return p.path("corpus-full") if any(limits(p.args).values()) else p.path("corpus")


def check_user_corpus(a):
    """Read, clean and split ``a.data`` as the corpus step will; a build_corpus.CorpusError naming the file
    if it is malformed or holds too few pairs for the split and the --{train,valid,test}-pairs asked for."""
    pairs, record = build_corpus.load_tsv(a.data, langs(a), a.clean_limits)
    summary = build_corpus.cleaning_summary(record["read"], record["kept"], record["dropped"], record["limits"])
    try:
        splits = build_corpus.split(pairs, a.seed)
    except build_corpus.CorpusError as e:
        raise build_corpus.CorpusError("%s: %s (%s)" % (a.data, e, summary)) from None
    short = ["--%s-pairs %d" % (s, n) for s, n in limits(a).items() if n > len(splits[s])]
    if short:
        raise build_corpus.CorpusError("%s: %s; the split gives train %d / valid %d / test %d pairs, fewer than %s"
                                       % (a.data, summary, *(len(splits[s]) for s in SPLITS), ", ".join(short)))


def make_corpus(p):
    """WORK/corpus/{train,valid,test}.{src,tgt}: LibreOffice help (or --data TSV), cleaned, subsampled on request.
    The cleaning counts go to the progress output and WORK/logs/corpus.log."""
    a, out = p.args, p.path("corpus")
    full = full_corpus_dir(p)
    with open(p.path("logs", "corpus.log"), "w", encoding="utf-8") as log:
        def note(message):
            log.write(message + "\n")
            p.progress("corpus", message)

        build_corpus.build(full, a.cache, tsv=a.data, seed=a.seed, log=note, langs=langs(a), limits=a.clean_limits)
    if full != out:
        os.makedirs(out, exist_ok=True)
        for split in SPLITS:
            for lang in langs(a):
                lines = read_lines(os.path.join(full, "%s.%s" % (split, lang)))
                write_lines(os.path.join(out, "%s.%s" % (split, lang)), lines[:limits(a)[split] or None])


def corpus_step_cmd(a):
    """What the corpus step depends on (its done-marker notes a change)."""
    return {"data": a.data, "langs": list(langs(a)), "seed": a.seed, "clean": a.clean_limits, "pairs": limits(a)}


def train_bpe(p):
    """Joint sentencepiece BPE on train.src + train.tgt; WORK/bpe/{split}.{lang} hold the pieces."""
    import sentencepiece as spm

    os.makedirs(p.path("bpe"), exist_ok=True)
    prefix = p.path("bpe", "spm")
    with open(p.path("logs", "bpe.log"), "w") as log:
        try:
            spm.SentencePieceTrainer.train(
                input=[p.path("corpus", "train.%s" % lang) for lang in langs(p.args)], model_prefix=prefix,
                vocab_size=p.args.bpe_size, model_type="bpe", character_coverage=1.0, num_threads=2,
                logstream=log)
        except RuntimeError as e:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
            raise StepFailed("step bpe failed (--bpe-size %d): %s" % (p.args.bpe_size, str(e).split("] ")[-1]))
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for split in SPLITS:
        for lang in langs(p.args):
            path = p.path("corpus", "%s.%s" % (split, lang))
            pieces = sp.encode(read_lines(path), out_type=str)
            long = next((i for i, x in enumerate(pieces) if len(x) > MAX_PIECES), None)
            if long is not None:  # fairseq would stop on it ("Size of sample is invalid") minutes later
                raise StepFailed("step bpe failed: %s line %d has %d BPE pieces, fairseq's transformer takes at "
                                 "most %d (lower --clean-max-chars)" % (path, long + 1, len(pieces[long]), MAX_PIECES))
            write_lines(p.path("bpe", "%s.%s" % (split, lang)), [" ".join(x) for x in pieces])


def preprocess_cmd(p):
    bpe = p.path("bpe")
    src, tgt = langs(p.args)
    return [tool("fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt, "--joined-dictionary",
            "--trainpref", os.path.join(bpe, "train"), "--validpref", os.path.join(bpe, "valid"),
            "--testpref", os.path.join(bpe, "test"), "--destdir", p.path("data-bin"), "--workers", "2"]
