r"""kd-distill-corpus from-text: translations made by any system, as a teacher-decoded corpus.

    kd-distill-corpus from-text --data DATA_BIN --split train --text HYP.txt --out DIR
                                [--spm spm.model] [--max-empty-share 0.01] [--overwrite]

HYP.txt holds one translation per source sentence of the split, in the split's order (line i for sentence
i), UTF-8. With ``--spm MODEL`` each line is plain detokenized text, cut into pieces by the student's
sentencepiece model; without it each line is already space-separated pieces of the student's dictionary.
The pieces become target-dictionary ids ending with eos exactly as fairseq-preprocess binarizes text
(``Dictionary.encode_line``; pieces outside the dictionary become <unk>, counted), and the output is what
the fairseq engine writes: DIR/{split}.{src}-{tgt}.{tgt}.{bin,idx,txt,json}, which ``--task translation_kd
--teacher-targets DIR`` loads and checks (count and dictionary) like any other. The .json records the
origin: the text file's path and sha256, the sentencepiece model's, the empty lines and <unk> pieces.

Refused with one line, exit status 2 and nothing written: a line count that differs from the split's, a
file that is not UTF-8 (the first bad line is named), more empty lines than ``--max-empty-share`` of the
split (an empty line is an empty translation: eos only), a missing file. A teacher with another vocabulary
(an LLM, a pretrained model with its own tokenizer) can serve sentence-level KD this way; token-level KD
needs the teacher's distribution in the student's vocabulary, which text cannot carry.
"""
import argparse
import logging
import os

import numpy as np
from fairseq.data.indexed_dataset import best_fitting_int_dtype

from kd_plugin.checks import KDConfigError, dictionary_checksum
from kd_plugin.cli import fairseq_io, flags, outputs
from kd_plugin.cli.fairseq_io import CORPUS_SUFFIXES
from kd_plugin.data.kd_dataset import teacher_targets_prefix

logger = logging.getLogger("kd_plugin.cli.distill_text")


def get_parser(prog):
    parser = argparse.ArgumentParser(prog=prog, description="Binarize translations made by any system as a "
                                                            "teacher-decoded corpus (sentence-level KD).")
    flags.add_data_args(parser)
    parser.add_argument("--text", required=True, metavar="HYP.txt",
                        help="one translation per line of the split, in its order, UTF-8")
    parser.add_argument("--spm", metavar="MODEL", default=None,
                        help="sentencepiece model of the student: --text is plain text (else: dictionary pieces)")
    parser.add_argument("--max-empty-share", type=float, default=0.01,
                        help="refuse the file when more than this share of its lines is empty")
    flags.add_output_args(parser)
    return parser


def read_lines(path, expected):
    """The lines of ``path`` (UTF-8, without newlines), checked: exists, decodes, ``expected`` lines."""
    if not os.path.isfile(path):
        raise KDConfigError("--text: %s not found" % path)
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) != expected:
        raise KDConfigError("--text: %s has %d lines but the split has %d sentences (one translation per line, "
                            "in the split's order)" % (path, len(lines), expected))
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise KDConfigError("--text: %s line %d is not UTF-8 (byte 0x%02x at column %d): convert the file "
                                "to UTF-8" % (path, i + 1, line[e.start], e.start + 1)) from None
    return out


def to_pieces(lines, spm_path):
    """Space-separated pieces per line: sentencepiece-encoded with ``spm_path``, else the lines as they are."""
    if spm_path is None:
        return [" ".join(line.split()) for line in lines]
    if not os.path.isfile(spm_path):
        raise KDConfigError("--spm: %s not found" % spm_path)
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=spm_path)
    except (RuntimeError, OSError) as e:
        raise KDConfigError("--spm: %s is not a sentencepiece model (%s)" % (spm_path, e)) from None
    return [" ".join(p) for p in sp.encode(lines, out_type=str)]


def run(args):
    if not 0 <= args.max_empty_share <= 1:
        raise KDConfigError("--max-empty-share must be in [0, 1], got %s" % args.max_empty_share)
    task = fairseq_io.setup_task(fairseq_io.fairseq_config(args.data, args.source_lang, args.target_lang))
    src, tgt, tgt_dict = task.cfg.source_lang, task.cfg.target_lang, task.target_dictionary
    n = len(fairseq_io.load_split(task, args.split))
    prefix = teacher_targets_prefix(args.out, args.split, src, tgt)
    out = outputs.AtomicOutput(prefix, CORPUS_SUFFIXES, args.overwrite)  # refuses existing output before any work
    lines = read_lines(args.text, n)
    empty = sum(1 for line in lines if not line.strip())
    if empty > args.max_empty_share * n:
        raise KDConfigError("--text: %s has %d empty lines (%.1f%% of %d), more than --max-empty-share %s"
                            % (args.text, empty, 100.0 * empty / max(n, 1), n, args.max_empty_share))
    seqs = [tgt_dict.encode_line(p, add_if_not_exist=False, append_eos=True).numpy()
            for p in to_pieces(lines, args.spm)]
    unk = int(sum((s == tgt_dict.unk()).sum() for s in seqs))
    meta = {
        "split": args.split, "source_lang": src, "target_lang": tgt, "data": os.path.abspath(args.data),
        "split_size": n, "count": n, "range": [0, n], "shard": {"id": 0, "num_shards": 1},
        "dictionary_md5": dictionary_checksum(tgt_dict),
        "origin": {"kind": "text", "path": os.path.abspath(args.text), "sha256": fairseq_io.file_sha256(args.text),
                   "spm": args.spm and os.path.abspath(args.spm),
                   "spm_sha256": args.spm and fairseq_io.file_sha256(args.spm)},
        "empty_lines": empty, "unk_tokens": unk, "tokens": int(sum(len(s) for s in seqs)),
    }
    dtype = best_fitting_int_dtype(len(tgt_dict))
    with out:
        fairseq_io.write_corpus(out.tmp_prefix, [np.asarray(s) for s in seqs], tgt_dict, dtype, meta)
    logger.info("wrote %s{%s}: %d sentences, %d tokens, %d <unk>, %d empty", prefix, ",".join(CORPUS_SUFFIXES), n,
                meta["tokens"], unk, empty)
