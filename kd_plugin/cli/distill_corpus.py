r"""kd-distill-corpus: a binarized split decoded by the teacher, for sentence-level KD (Kim & Rush, 2016).

    kd-distill-corpus --data DATA_BIN --path T.pt[:T2.pt] --split train --out DIR
                      [--engine fairseq|ctranslate2] [--beam 5] [--lenpen 1.0] [--max-len-a 0] [--max-len-b 200]
                      [--nbest N --select top|bleu|chrf [--remove-bpe sentencepiece]]
                      [--max-tokens 4000 | --batch-size N] [--num-shards N --shard-id I] [--overwrite]
    kd-distill-corpus merge --out DIR --split train [--source-lang S --target-lang T] [--overwrite]
    kd-distill-corpus from-text --data DATA_BIN --split train --text HYP.txt --out DIR [--spm spm.model]
                      (translations made by any system: kd_plugin/cli/distill_text.py)

For every sentence x_i of the split, y^_i = the 1-best of fairseq's beam search under the teacher
(an ensemble averages the members' probabilities, fairseq's EnsembleModel); y^_i is exactly the ``H-i``
line of ``fairseq-generate DATA --path T.pt --gen-subset SPLIT`` with the same flags. With
``--engine ctranslate2`` the same batches are decoded by CTranslate2 from a cached conversion of the
teacher (kd_plugin/cli/ct2_engine.py: greedy output identical to fairseq's, beam output measured in
docs/DISTILL.md; one checkpoint, no ensemble). With ``--nbest N --select bleu|chrf`` y^_i is instead the
hypothesis of the teacher's n-best closest to the reference (Seq-Inter, kd_plugin/cli/nbest.py). Output prefix
DIR/{split}.{src}-{tgt}.{tgt} (what ``--task translation_kd --teacher-targets DIR`` loads):

  .bin/.idx  y^_i as target-dictionary ids ending with eos (an empty hypothesis is just eos), entry i
             for sentence i, written like fairseq-preprocess output (MMapIndexedDataset, smallest dtype);
  .txt       y^_i as text (tgt_dict.string), one line each, for inspection;
  .json      split, split_size, count, range, dictionary_md5 (kd_plugin.checks.dictionary_checksum of the
             target dictionary, checked by the task), teacher_sha256 / teacher_paths, generation and
             batching flags.
The hypotheses are held in memory (one flat array, about the size of the .bin) until the end.

Sharding: ``--num-shards N --shard-id I`` decodes the contiguous index range
[floor(n I / N), floor(n (I+1) / N)) of the n sentences into DIR/shards/{split}.{src}-{tgt}.{tgt}.shard{I}of{N}.*;
``merge`` concatenates the N shards in order into DIR/{split}.{src}-{tgt}.{tgt}.* after checking that
they agree on everything but their range (split size, dictionary, teacher sha256, generation and batching
flags; data and teacher paths may differ) and cover [0, n) exactly. The shard files are kept
(DIR/shards can be deleted after merging).

Determinism: for fixed data, teacher and flags the output is fixed. Sharding only changes which
sentences share a batch, which matters in two ways: with --max-len-a > 0 fairseq's length limit is
a * (longest padded source in the batch) + b, so keep --max-len-a 0 (default) for sharding-invariant
output; and padding changes matrix shapes, which could in principle flip a float32 near-tie. Measured on
CPU (float32) on the toy corpus: --batch-size 1, --batch-size 7 and --max-tokens 4000 give byte-identical
output for all 1500 training sentences (1 or 2 threads alike), the sharded + merged output is
byte-identical to an unsharded run, and the hypotheses equal fairseq-generate's (--max-tokens 12000).
Speed: on a shared CPU set --cpu-threads (or OMP_NUM_THREADS) to the free cores: oversubscribed
OpenMP threads slowed the toy run five-fold.

Safety: existing output is refused unless --overwrite (nothing is written); files are written under a
temporary directory in DIR and renamed into place at the end, .idx last (see cli.outputs.AtomicOutput),
so an interrupted run never leaves a loadable half-written dataset. Bad input exits with status 2 and
one message.
"""
import argparse
import logging
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
from fairseq import utils
from fairseq.data.indexed_dataset import (MMapIndexedDataset, MMapIndexedDatasetBuilder, best_fitting_int_dtype,
                                          data_file_path, index_file_path)

from kd_plugin.checks import KDConfigError, dictionary_checksum
from kd_plugin.cli import ct2_engine, distill_text, fairseq_io, flags, nbest, outputs
from kd_plugin.cli.fairseq_io import CORPUS_SUFFIXES
from kd_plugin.data.kd_dataset import teacher_targets_prefix

logger = logging.getLogger("kd_plugin.cli.distill_corpus")

PROG = "kd-distill-corpus"
# metadata that may differ between shards of one run (e.g. made on machines with other mount points)
NOT_COMPARED = outputs.SHARD_KEYS + ("data", "teacher_paths")


def get_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Decode a fairseq binarized split with a teacher for sentence-level KD.",
        epilog="merge shards: %s merge --out DIR --split SPLIT (see '%s merge --help'); translations from any "
               "system: %s from-text --text HYP.txt ... (see '%s from-text --help')" % (PROG, PROG, PROG, PROG))
    flags.add_data_args(parser)
    flags.add_teacher_args(parser)
    g = parser.add_argument_group("beam search (fairseq-generate's flags)")
    g.add_argument("--beam", type=flags.positive_int, default=5)
    g.add_argument("--lenpen", type=float, default=1.0, help="length penalty (scores / length^lenpen)")
    g.add_argument("--max-len-a", type=float, default=0, help="max length = a * source length + b")
    g.add_argument("--max-len-b", type=int, default=200)
    g.add_argument("--engine", choices=("fairseq", "ctranslate2"), default="fairseq",
                   help="decoder: fairseq's SequenceGenerator, or CTranslate2 on a cached conversion of the "
                        "teacher (one checkpoint; faster on CPU)")
    g.add_argument("--ct2-quantization", choices=ct2_engine.QUANTIZATIONS, default="float32",
                   help="weights of the CTranslate2 conversion (float32: output as fairseq's)")
    g.add_argument("--inter-threads", type=flags.positive_int, default=1,
                   help="CTranslate2: batches decoded in parallel (each with --cpu-threads threads)")
    g = parser.add_argument_group("n-best selection (Seq-Inter)")
    g.add_argument("--nbest", type=flags.positive_int, default=1, help="hypotheses kept per sentence (<= --beam)")
    g.add_argument("--select", choices=nbest.SELECT, default="top",
                   help="top: the teacher's best; bleu/chrf: the n-best hypothesis closest to the reference")
    g.add_argument("--remove-bpe", default=None, metavar="SYMBOL",
                   help="fairseq's post-processing before --select bleu|chrf (e.g. sentencepiece)")
    flags.add_batch_args(parser)
    flags.add_output_args(parser)
    return parser


def get_merge_parser():
    parser = argparse.ArgumentParser(prog=PROG + " merge",
                                     description="Concatenate DIR/shards/{split}.*.shard{I}of{N} in order.")
    parser.add_argument("--out", required=True, metavar="DIR", help="the --out of the sharded runs")
    parser.add_argument("--split", default="train")
    parser.add_argument("-s", "--source-lang", default=None)
    parser.add_argument("-t", "--target-lang", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged output")
    return parser


class Hypotheses:
    """Token sequences for the indices [lo, hi), added in batch order, read back in index order.

    Kept as one flat array per batch (no per-sentence objects), so memory is about the output size.
    """

    def __init__(self, lo, hi, dtype):
        self.lo, self.dtype = lo, dtype
        self.offsets = np.full(hi - lo, -1, dtype=np.int64)
        self.lengths = np.zeros(hi - lo, dtype=np.int64)
        self.chunks, self.total = [], 0

    def add(self, ids, seqs):
        for i, s in zip(ids, seqs):
            if self.offsets[i - self.lo] >= 0:
                raise RuntimeError("sentence %d decoded twice" % i)
            self.offsets[i - self.lo], self.lengths[i - self.lo] = self.total, len(s)
            self.total += len(s)
        self.chunks.append(np.concatenate(seqs).astype(self.dtype))

    def __iter__(self):
        missing = np.flatnonzero(self.offsets < 0)
        if len(missing):
            raise RuntimeError("%d sentences were not decoded, e.g. %d" % (len(missing), missing[0] + self.lo))
        flat = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=self.dtype)
        for off, n in zip(self.offsets, self.lengths):
            yield flat[off:off + n]


def hypothesis_tokens(hypo, eos):
    """The 1-best's ids as fairseq-preprocess stores a sentence: ending with (exactly one) eos."""
    tokens = hypo["tokens"].cpu().numpy()
    return tokens if len(tokens) and tokens[-1] == eos else np.append(tokens, eos)


def fairseq_decoder(task, models, gen_cfg, cuda):
    """fairseq's beam search: ``sample`` -> per sentence its n-best [(ids ending with EOS, score)]."""
    generator = task.build_generator(models, gen_cfg)
    eos = task.target_dictionary.eos()

    def decode(sample):
        if cuda:
            sample = utils.move_to_cuda(sample)
        out = task.inference_step(generator, models, sample)
        return [[(hypothesis_tokens(h, eos), float(h["score"])) for h in hs[:gen_cfg.nbest]] for hs in out]
    return decode


def decode(decoder, itr, selector, pad, hyps, progress):
    """Decode every batch of ``itr``; the selected hypothesis goes into ``hyps`` by sample id (references for
    --select bleu|chrf: the batch's own targets, padding stripped)."""
    for sample in itr:
        if "net_input" not in sample:  # empty batch
            continue
        ids = sample["id"].tolist()
        chosen = []
        for j, candidates in enumerate(decoder(sample)):
            reference = utils.strip_pad(sample["target"][j], pad) if selector.metric is not None else None
            chosen.append(candidates[selector.choose(candidates, reference)][0])
        hyps.add(ids, chosen)
        progress.update(len(ids))
    progress.finish()


def check_generation_args(args, dataset):
    if args.nbest > args.beam:
        raise KDConfigError("--nbest %d exceeds --beam %d" % (args.nbest, args.beam))
    if args.select != "top" and args.nbest == 1:
        raise KDConfigError("--select %s chooses among the n-best: pass --nbest > 1" % args.select)
    if args.select != "top" and getattr(dataset, "tgt", None) is None:
        raise KDConfigError("--select %s needs the references: the %s split has no target side"
                            % (args.select, args.split))


def build_decoder(args, task, models, paths, teachers, cfg, cuda):
    if args.engine == "fairseq":
        return fairseq_decoder(task, models, cfg.generation, cuda)
    model_dir = ct2_engine.cached_model(paths[0], teachers[0]["sha256"], args.data, task.cfg.source_lang,
                                        task.cfg.target_lang, args.ct2_quantization, args.out)
    translator = ct2_engine.load_translator(model_dir, args.cpu_threads or 1, args.inter_threads)
    gen = {"beam": args.beam, "nbest": args.nbest, "lenpen": args.lenpen, "max_len_a": args.max_len_a,
           "max_len_b": args.max_len_b}
    return ct2_engine.Decoder(translator, task.source_dictionary, task.target_dictionary, gen,
                              models[0].max_decoder_positions())


def distill(args):
    flags.check_batch_args(args)
    cfg = fairseq_io.fairseq_config(args.data, args.source_lang, args.target_lang, "--beam", args.beam, "--nbest",
                                    args.nbest, "--lenpen", args.lenpen, "--max-len-a", args.max_len_a,
                                    "--max-len-b", args.max_len_b)
    task = fairseq_io.setup_task(cfg)
    src, tgt, tgt_dict = task.cfg.source_lang, task.cfg.target_lang, task.target_dictionary
    dataset = fairseq_io.load_split(task, args.split)
    check_generation_args(args, dataset)
    if args.engine == "ctranslate2":
        ct2_engine.check_teacher(args.path.split(":"))
    lo, hi = fairseq_io.shard_range(len(dataset), args.num_shards, args.shard_id)
    prefix = teacher_targets_prefix(args.out, args.split, src, tgt)
    if args.num_shards > 1:
        prefix = outputs.shard_prefix(prefix, args.shard_id, args.num_shards)
    out = outputs.AtomicOutput(prefix, CORPUS_SUFFIXES, args.overwrite)  # refuses existing output before any work

    cuda = flags.use_cuda(args) and args.engine == "fairseq"
    models, paths = fairseq_io.load_ensemble(args.path, task, cuda=cuda)
    for m in models:
        m.prepare_for_inference_(SimpleNamespace(generation=cfg.generation))
    teachers = fairseq_io.teacher_info(paths)
    generation = {"beam": args.beam, "nbest": args.nbest, "lenpen": args.lenpen,
                  "max_len_a": args.max_len_a, "max_len_b": args.max_len_b, "engine": args.engine}
    if args.engine == "ctranslate2":
        generation["ct2_quantization"] = args.ct2_quantization
    if args.select != "top":
        generation.update(select=args.select, remove_bpe=args.remove_bpe)
    meta = {
        "split": args.split, "source_lang": src, "target_lang": tgt, "data": os.path.abspath(args.data),
        "split_size": len(dataset), "count": hi - lo, "range": [lo, hi],
        "shard": {"id": args.shard_id, "num_shards": args.num_shards},
        "dictionary_md5": dictionary_checksum(tgt_dict),
        "teacher_sha256": [t["sha256"] for t in teachers], "teacher_paths": [t["path"] for t in teachers],
        "generation": generation,
        "batching": {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "seed": args.seed},
    }
    decoder = build_decoder(args, task, models, paths, teachers, cfg, cuda)
    logger.info("decoding %s sentences [%d, %d) of %d with beam %d (%s) into %s", args.split, lo, hi, len(dataset),
                args.beam, args.engine, prefix)
    itr = fairseq_io.batch_iterator(task, dataset, models, (lo, hi), args.max_tokens, args.batch_size, args.seed)
    dtype = best_fitting_int_dtype(len(tgt_dict))
    hyps = Hypotheses(lo, hi, dtype)
    decode(decoder, itr, nbest.Selector(args.select, tgt_dict, args.remove_bpe), tgt_dict.pad(), hyps,
           fairseq_io.Progress(args.split, hi - lo, args.log_interval))
    with out:
        fairseq_io.write_corpus(out.tmp_prefix, hyps, tgt_dict, dtype, meta)
    logger.info("wrote %s{%s}", prefix, ",".join(CORPUS_SUFFIXES))


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def merge(args):
    if (args.source_lang is None) != (args.target_lang is None):
        raise KDConfigError("pass both --source-lang and --target-lang, or neither")
    if args.source_lang:
        wanted = os.path.basename(teacher_targets_prefix("", args.split, args.source_lang, args.target_lang))
        accept = wanted.__eq__
    else:
        accept = re.compile(r"^%s\.[^.]+-[^.]+\.[^.]+$" % re.escape(args.split)).match
    name, prefixes = outputs.find_shards(args.out, accept)
    for p in prefixes:
        for suffix in CORPUS_SUFFIXES:
            if not os.path.isfile(p + suffix):
                raise KDConfigError("incomplete shard, no %s" % (p + suffix))
    metas = [outputs.read_json(p + ".json") for p in prefixes]
    meta = outputs.merge_shard_metas(metas, [p + ".json" for p in prefixes], ignore=NOT_COMPARED)
    indexes = [MMapIndexedDataset.Index(index_file_path(p)) for p in prefixes]
    for p, m, index in zip(prefixes, metas, indexes):
        if len(index) != m["count"] or _count_lines(p + ".txt") != m["count"]:
            raise KDConfigError("%s.{idx,txt} do not hold the %d sentences its .json announces"
                                % (p, m["count"]))
        if index.dtype != indexes[0].dtype:
            raise KDConfigError("%s.idx stores %s, %s.idx stores %s"
                                % (p, np.dtype(index.dtype), prefixes[0], np.dtype(indexes[0].dtype)))
    out = outputs.AtomicOutput(os.path.join(args.out, name), CORPUS_SUFFIXES, args.overwrite)
    with out:
        builder = MMapIndexedDatasetBuilder(data_file_path(out.tmp_prefix), dtype=indexes[0].dtype)
        with open(out.tmp_prefix + ".txt", "wb") as txt:
            for p in prefixes:
                builder.merge_file_(p)
                with open(p + ".txt", "rb") as f:
                    shutil.copyfileobj(f, txt)
        builder.finalize(index_file_path(out.tmp_prefix))
        outputs.write_json(out.tmp_prefix + ".json", meta)
    logger.info("merged %d shards (%d sentences) into %s{%s}", len(prefixes), meta["count"], out.prefix,
                ",".join(CORPUS_SUFFIXES))


def cli_main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["from-text"]:
        prog = PROG + " from-text"
        return flags.run_cli(distill_text.run, distill_text.get_parser(prog).parse_args(argv[1:]), prog)
    flags.cli_dispatch(PROG, distill, get_parser, merge, get_merge_parser, argv)


if __name__ == "__main__":
    cli_main()
