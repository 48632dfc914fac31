#!/usr/bin/env python3
"""Build the demo's German-English corpus from the LibreOffice help (or split and clean a SRC<TAB>TGT file).

    python examples/build_corpus.py --out work/demo/corpus [--cache work/cache] [--tsv FILE] [--seed 1]
                                    [--src-lang de --tgt-lang en] [--clean-max-tokens 250] ...

Sources, alignment, cleaning and the split: examples/kdexp/corpus.py.
"""
import argparse
import sys

from kdexp.corpus import LANGS, CorpusError, add_clean_args, build, clean_limits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work/demo/corpus", help="output directory")
    parser.add_argument("--cache", default="work/cache", help="where the .deb files are downloaded and unpacked")
    parser.add_argument("--tsv", help="use this SRC<TAB>TGT file instead of the LibreOffice help")
    parser.add_argument("--src-lang", default=LANGS[0], help="language code of the TSV's first column")
    parser.add_argument("--tgt-lang", default=LANGS[1], help="language code of the TSV's second column")
    parser.add_argument("--seed", type=int, default=1, help="seed of the train/valid/test split")
    add_clean_args(parser)
    args = parser.parse_args(argv)
    try:
        build(args.out, args.cache, args.tsv, args.seed, langs=(args.src_lang, args.tgt_lang),
              limits=clean_limits(parser, args))
    except CorpusError as e:
        sys.exit("build_corpus: " + str(e))


if __name__ == "__main__":
    main()
