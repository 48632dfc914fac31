"""Flags and error handling shared by kd-plugin's command-line tools (kd-distill-corpus, kd-dump-teacher, ...).

* :func:`run_cli`, :func:`cli_dispatch` -- bad input (:class:`KDConfigError`) becomes one line on stderr and
  exit status 2; ``prog merge ...`` dispatches to a tool's merge step.
* :func:`add_data_args`, :func:`add_teacher_args`, :func:`add_batch_args`, :func:`add_output_args`,
  :func:`check_batch_args` -- the flags every tool spells the same way.
"""
import argparse
import logging
import os
import sys

import torch

from kd_plugin.checks import KDConfigError
from kd_plugin.fairseq_patches.cli_errors import exit_with


def setup_logging():
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=os.environ.get("LOGLEVEL", "INFO").upper(),
                        stream=sys.stderr)


def run_cli(main, args, prog):
    """``main(args)``; a KDConfigError is reported as ``prog: error: message`` with exit status 2."""
    setup_logging()
    try:
        return main(args)
    except KDConfigError as e:
        exit_with(prog, e)


def positive_int(value):
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1, got %s" % value)
    return n


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="DIR", help="fairseq binarized data dir (fairseq-preprocess)")
    g.add_argument("--split", default="train", help="split to process (default: train)")
    g.add_argument("-s", "--source-lang", default=None, help="inferred from the data dir when omitted")
    g.add_argument("-t", "--target-lang", default=None, help="inferred from the data dir when omitted")
    return g


def add_teacher_args(parser):
    g = parser.add_argument_group("teacher")
    g.add_argument("--path", required=True, metavar="A.pt[:B.pt]",
                   help="teacher checkpoint(s), colon-separated for an ensemble (probabilities averaged)")
    return g


def add_batch_args(parser):
    g = parser.add_argument_group("batching and sharding")
    g.add_argument("--max-tokens", type=positive_int, default=None,
                   help="source tokens per batch (default 4000 when --batch-size is not given either)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="sentences per batch")
    g.add_argument("--num-shards", type=positive_int, default=1, help="split the split into N index ranges")
    g.add_argument("--shard-id", type=int, default=0, help="which range to process, 0 <= I < N")
    g.add_argument("--seed", type=int, default=1, help="fairseq's batching seed (ties in the length sort)")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    g.add_argument("--cpu-threads", type=positive_int, default=None, help="torch intra-op threads")
    g.add_argument("--log-interval", type=positive_int, default=10, help="log progress every N batches")
    return g


def add_output_args(parser):
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return g


def check_batch_args(args):
    """Defaults and cross-flag checks for :func:`add_batch_args`; also applies --cpu-threads."""
    if not 0 <= args.shard_id < args.num_shards:
        raise KDConfigError("--shard-id %d is out of range for --num-shards %d" % (args.shard_id, args.num_shards))
    if args.max_tokens is None and args.batch_size is None:
        args.max_tokens = 4000
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)


def use_cuda(args):
    return torch.cuda.is_available() and not args.cpu


def cli_dispatch(prog, run, get_parser, merge, get_merge_parser, argv=None):
    """``prog ...`` runs ``run``; ``prog merge ...`` runs ``merge`` (each through :func:`run_cli`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        run_cli(merge, get_merge_parser().parse_args(argv[1:]), prog + " merge")
    else:
        run_cli(run, get_parser().parse_args(argv), prog)
