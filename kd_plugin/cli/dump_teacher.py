r"""kd-dump-teacher: a teacher's top-K log-probabilities on every gold target token of a split, for
token-level KD without running the teacher during training (``--teacher-cache DIR``).

    kd-dump-teacher --data DATA_BIN --path T.pt[:T2.pt] --split train --topk 8 --out DIR
                    [--max-tokens 4000 | --batch-size N] [--num-shards N --shard-id I] [--overwrite]
    kd-dump-teacher merge --out DIR --split train [--overwrite]

Teacher forcing on the gold target: position t of sentence i gets the teacher's distribution
p(. | y_<t, x) (an ensemble averages the members' probabilities, kd_plugin.teacher.Teacher), of which
the store keeps the K most likely ids with their log-probs and the log-mass outside them
(kd_plugin.data.teacher_cache.topk_and_rest). Store layout: see kd_plugin/data/teacher_cache.py
(DIR/{split}.topk.{lprobs.f16,ids.u16,rest.f16,idx,json}). Dump every split the training reads
(train and valid): ``--teacher-cache`` loads the cache of each. kd-distill-corpus --out DIR can put the
teacher-decoded targets in the same directory.

Sharding: ``--num-shards N --shard-id I`` runs the teacher on a contiguous index range of the split
into DIR/shards/{split}.topk.shard{I}of{N}.*; ``merge`` checks that the shards come from the same data,
teacher (sha256) and flags and cover [0, n), and concatenates them into DIR/{split}.topk.* (the shards
are kept). Batches never cross a block of --block-size consecutive sentence ids (within a block, fairseq's
length-sorted batching) and a shard is whole blocks (blocks [floor(b I / N), floor(b (I+1) / N)) of b),
so every sentence is run in the same batch whatever the sharding: a merged store is byte-identical to
an unsharded one (same flags, hardware and thread settings). Without blocks a different batch shape
changes the last float32 bit on some kernels, and so now and then an fp16 value by one ulp.

Safety: existing output is refused unless --overwrite (before any work); files are written under a
temporary directory next to the output and renamed into place at the end, the header last
(kd_plugin.cli.outputs.AtomicOutput). Bad input exits with status 2 and one message.
"""
import argparse
import logging
import os
import shutil
import time

import numpy as np
from fairseq import utils
from fairseq.data import BaseWrapperDataset

from kd_plugin.checks import KDConfigError, dictionary_checksum
from kd_plugin.cli import fairseq_io, flags, outputs
from kd_plugin.data.teacher_cache import (FORMAT, LPROBS_DTYPE, OFFSETS_DTYPE, VERSION, cache_prefix, check_store,
                                          ids_dtype, read_header, suffixes, to_fp16, topk_and_rest)
from kd_plugin.teacher import Teacher

logger = logging.getLogger("kd_plugin.cli.dump_teacher")

PROG = "kd-dump-teacher"
# header keys that may differ between the shards of one run (other mount points; per-shard counts)
NOT_COMPARED = outputs.SHARD_KEYS + ("data", "teacher_paths", "num_tokens")
DATA_PARTS = ("lprobs", "ids", "rest")


def get_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Cache a teacher's top-K log-probs on the gold targets of a binarized split.",
        epilog="merge shards: %s merge --out DIR --split SPLIT (see '%s merge --help')" % (PROG, PROG))
    flags.add_data_args(parser)
    flags.add_teacher_args(parser)
    parser.add_argument("--topk", type=flags.positive_int, default=8, help="K most likely tokens kept per position")
    g = flags.add_batch_args(parser)
    g.add_argument("--block-size", type=flags.positive_int, default=10000,
                   help="batches stay within blocks of this many consecutive sentences, shards are whole blocks "
                        "(sharding-invariant output)")
    flags.add_output_args(parser)
    return parser


def get_merge_parser():
    parser = argparse.ArgumentParser(prog=PROG + " merge",
                                     description="Concatenate DIR/shards/{split}.topk.shard{I}of{N}.* in order.")
    parser.add_argument("--out", required=True, metavar="DIR", help="the --out of the sharded runs")
    parser.add_argument("--split", default="train")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged cache")
    return parser


class BlockBatches(BaseWrapperDataset):
    """``dataset`` batched by fairseq within blocks of ``block`` consecutive sentence ids, blocks in order."""

    def __init__(self, dataset, block):
        super().__init__(dataset)
        self.block = block

    def ordered_indices(self):
        indices = self.dataset.ordered_indices()
        return indices[np.argsort(indices // self.block, kind="stable")]

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        blocks = np.split(indices, np.flatnonzero(np.diff(indices // self.block)) + 1)
        return [b for blk in blocks if len(blk)
                for b in self.dataset.batch_by_size(blk, max_tokens, max_sentences, required_batch_size_multiple)]


def shard_range(n, block, num_shards, shard_id):
    """Shard I of N: the sentences of blocks [floor(b I / N), floor(b (I+1) / N)), b = ceil(n / block)."""
    lo, hi = fairseq_io.shard_range(-(-n // block), num_shards, shard_id)
    return min(lo * block, n), min(hi * block, n)


def teacher_batches(task, dataset, models, index_range, args):
    """The batches kd-dump-teacher runs the teacher on, for sentences in ``index_range``."""
    return fairseq_io.batch_iterator(task, BlockBatches(dataset, args.block_size), models, index_range,
                                 args.max_tokens, args.batch_size, args.seed)


class TopKStore:
    """The data files and offsets of sentences [lo, lo + len(lengths)), preallocated (np.memmap) and
    filled by sentence in any order; :meth:`finish` checks every sentence was written once."""

    def __init__(self, prefix, lengths, k, dtype):
        self.prefix, self.k, self.sfx = prefix, k, suffixes(dtype)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(OFFSETS_DTYPE)
        self.rows = int(self.offsets[-1])
        self.written = np.zeros(len(self.lengths), dtype=bool)
        shapes = {"lprobs": ((self.rows, k), LPROBS_DTYPE), "ids": ((self.rows, k), dtype),
                  "rest": ((self.rows,), LPROBS_DTYPE)}
        self.arrays = {part: self._create(prefix + self.sfx[part], *shapes[part]) for part in DATA_PARTS}

    @staticmethod
    def _create(path, shape, dtype):
        if shape[0] == 0:  # np.memmap cannot map an empty file
            open(path, "wb").close()
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="w+", shape=shape)

    def add(self, i, lprobs, ids, rest):
        """Sentence ``i`` (0-based within the store): L x K, L x K and L rows, L its gold length."""
        if self.written[i] or len(lprobs) != self.lengths[i]:
            raise RuntimeError("sentence %d: %d rows for a target of %d tokens%s"
                               % (i, len(lprobs), self.lengths[i], ", written twice" if self.written[i] else ""))
        rows = slice(self.offsets[i], self.offsets[i + 1])
        self.arrays["lprobs"][rows], self.arrays["ids"][rows], self.arrays["rest"][rows] = lprobs, ids, rest
        self.written[i] = True

    def finish(self):
        missing = np.flatnonzero(~self.written)
        if len(missing):
            raise RuntimeError("%d sentences were not processed, e.g. %d" % (len(missing), missing[0]))
        for a in self.arrays.values():
            if isinstance(a, np.memmap):
                a.flush()
        self.arrays = None  # unmaps the files
        self.offsets.tofile(self.prefix + self.sfx["offsets"])


def run_teacher(teacher, itr, store, lo, k, pad, progress, cuda):
    """Teacher-forced top-K (+ rest mass) of every target token of ``itr``'s batches into ``store``."""
    for sample in itr:
        if "net_input" not in sample:  # empty batch
            continue
        if cuda:
            sample = utils.move_to_cuda(sample)
        lprobs = teacher.signal(sample["net_input"], teacher.models[0])["lprobs"]
        mask = sample["target"].ne(pad)
        top_lp, top_ids, rest = topk_and_rest(lprobs[mask], k)  # N x K, N x K, N over the real tokens
        top_lp, top_ids, rest = to_fp16(top_lp), top_ids.cpu().numpy(), to_fp16(rest)
        ends = np.cumsum(mask.sum(1).cpu().numpy())
        for b, i in enumerate(sample["id"].tolist()):
            rows = slice(ends[b - 1] if b else 0, ends[b])
            store.add(i - lo, top_lp[rows], top_ids[rows], rest[rows])
        progress.update(len(ends))
    progress.finish()


def dump(args):
    flags.check_batch_args(args)
    task = fairseq_io.setup_task(fairseq_io.fairseq_config(args.data, args.source_lang, args.target_lang))
    tgt_dict = task.target_dictionary
    if args.topk > len(tgt_dict):
        raise KDConfigError("--topk %d exceeds the target vocabulary (%d types)" % (args.topk, len(tgt_dict)))
    dataset = fairseq_io.load_split(task, args.split)
    if dataset.tgt_sizes is None:
        raise KDConfigError("--split %s has no targets to run the teacher on" % args.split)
    lo, hi = shard_range(len(dataset), args.block_size, args.num_shards, args.shard_id)
    prefix = cache_prefix(args.out, args.split)
    if args.num_shards > 1:
        prefix = outputs.shard_prefix(prefix, args.shard_id, args.num_shards)
    dtype = ids_dtype(len(tgt_dict))
    out = outputs.AtomicOutput(prefix, suffixes(dtype).values(), args.overwrite)  # refuses before any work

    cuda = flags.use_cuda(args)
    teacher = Teacher(*fairseq_io.load_ensemble(args.path, task, cuda=cuda))
    teachers = fairseq_io.teacher_info(teacher.paths)
    header = {
        "format": FORMAT, "version": VERSION, "split": args.split, "data": os.path.abspath(args.data),
        "source_lang": task.cfg.source_lang, "target_lang": task.cfg.target_lang,
        "split_size": len(dataset), "count": hi - lo, "range": [lo, hi],
        "k": args.topk, "ids_dtype": dtype.str, "vocab_size": len(tgt_dict),
        "dictionary_md5": dictionary_checksum(tgt_dict),
        "teacher_sha256": [t["sha256"] for t in teachers], "teacher_paths": [t["path"] for t in teachers],
        "batching": {"max_tokens": args.max_tokens, "batch_size": args.batch_size, "seed": args.seed,
                     "block_size": args.block_size},
        "targets": "gold",
    }
    if args.num_shards > 1:
        header["shard"] = {"id": args.shard_id, "num_shards": args.num_shards}
    logger.info("top-%d of %s sentences [%d, %d) of %d into %s", args.topk, args.split, lo, hi, len(dataset), prefix)
    itr = teacher_batches(task, dataset, teacher.models, (lo, hi), args)
    start = time.perf_counter()
    with out:
        store = TopKStore(out.tmp_prefix, dataset.tgt_sizes[lo:hi], args.topk, dtype)
        run_teacher(teacher, itr, store, lo, args.topk, tgt_dict.pad(),
                    fairseq_io.Progress(args.split, hi - lo, args.log_interval), cuda)
        store.finish()
        header["num_tokens"] = store.rows
        outputs.write_json(out.tmp_prefix + ".json", header)
    elapsed = time.perf_counter() - start
    logger.info("wrote %s.* : %d tokens in %.1f s (%.0f tokens/s), %.1f bytes/token", prefix, store.rows, elapsed,
                store.rows / max(elapsed, 1e-9), sum(os.path.getsize(f) for f in out.files) / max(store.rows, 1))


def merge(args):
    name = os.path.basename(cache_prefix(args.out, args.split))
    _, prefixes = outputs.find_shards(args.out, name.__eq__)
    headers = [read_header(p, "merge") for p in prefixes]
    lengths = [check_store(p, h, "merge") for p, h in zip(prefixes, headers)]
    meta = outputs.merge_shard_metas(headers, [p + ".json" for p in prefixes], ignore=NOT_COMPARED)
    meta.pop("shard")  # the merged header equals an unsharded run's
    meta["num_tokens"] = sum(h["num_tokens"] for h in headers)
    sfx = suffixes(meta["ids_dtype"])
    out = outputs.AtomicOutput(cache_prefix(args.out, args.split), sfx.values(), args.overwrite)
    with out:
        for part in DATA_PARTS:
            with open(out.tmp_prefix + sfx[part], "wb") as dst:
                for p in prefixes:
                    with open(p + sfx[part], "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
        lengths = np.concatenate(lengths)
        np.concatenate([[0], np.cumsum(lengths)]).astype(OFFSETS_DTYPE).tofile(out.tmp_prefix + sfx["offsets"])
        outputs.write_json(out.tmp_prefix + ".json", meta)
    logger.info("merged %d shards (%d sentences, %d tokens) into %s.*", len(prefixes), meta["count"],
                meta["num_tokens"], out.prefix)


def cli_main(argv=None):
    import sys

    from kd_plugin.retired import DUMP_TEACHER_FLAGS, check_flags

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = PROG + " merge" if argv[:1] == ["merge"] else PROG
    # a retired flag (--targets, merge --on-targets): one line naming it, exit status 2, before any work
    flags.run_cli(lambda a: check_flags(a, DUMP_TEACHER_FLAGS), argv, prog)
    flags.cli_dispatch(PROG, dump, get_parser, merge, get_merge_parser, argv)


if __name__ == "__main__":
    cli_main()
