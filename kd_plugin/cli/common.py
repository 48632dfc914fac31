"""Plumbing shared by kd-plugin's command-line tools (kd-distill-corpus, kd-dump-teacher, ...).

* :func:`run_cli` -- bad input (:class:`KDConfigError`) becomes one line on stderr and exit status 2.
* :func:`add_data_args`, :func:`add_teacher_args`, :func:`add_batch_args`, :func:`add_output_args` --
  the flags every tool spells the same way.
* :func:`fairseq_config`, :func:`setup_task`, :func:`load_split` -- the stock ``translation`` task for a
  binarized data dir, configured by fairseq's own argument parser (every default is fairseq's), with
  clear errors.
* :func:`load_ensemble` -- teacher checkpoint(s) ``A.pt[:B.pt...]``, checked against the data dir's
  dictionaries (same errors as the ``translation_kd`` task), built in eval mode; :func:`teacher_info`.
* :func:`shard_range`, :func:`batch_iterator` -- shard I of N is the contiguous index range
  ``[floor(n I / N), floor(n (I+1) / N))`` of the split, batched by fairseq (length-sorted, fixed order).
* :class:`AtomicOutput` -- output files written under temporary names, renamed into place at the end.
* :func:`shard_prefix`, :func:`find_shards`, :func:`merge_shard_metas` -- shard files live in
  ``DIR/shards/{name}.shard{I}of{N}.*``; merging checks that the shards agree and cover the split exactly.
"""
import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time

import torch
from fairseq import options, tasks, utils
from fairseq.data import BaseWrapperDataset, data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from kd_plugin.checks import KDConfigError
from kd_plugin.cli_errors import exit_with
from kd_plugin.teacher import load_members

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^(?P<name>.+)\.shard(?P<id>\d+)of(?P<num>\d+)\.idx$")
# metadata keys that legitimately differ between the shards of one run
SHARD_KEYS = ("count", "range", "shard")


# ---------------------------------------------------------------------------------------------- CLI


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


# ---------------------------------------------------------------------------------------------- task


def fairseq_config(data, source_lang=None, target_lang=None, *extra):
    """fairseq's full config for the stock ``translation`` task on ``data``, as fairseq-generate parses it.

    ``extra``: more fairseq flags (e.g. ``--beam 5``); the languages are inferred from the data dir
    (``{split}.{src}-{tgt}.*``) when not given, as fairseq does.
    """
    first = data.split(":")[0]
    if not os.path.isdir(first):
        raise KDConfigError("--data: not a directory: %s" % first)
    if source_lang is None or target_lang is None:
        source_lang, target_lang = data_utils.infer_language_pair(first)
        if source_lang is None:
            raise KDConfigError("--data: cannot infer the language pair from the files in %s; "
                                "pass --source-lang and --target-lang" % first)
    for lang in (source_lang, target_lang):
        dict_file = os.path.join(first, "dict.%s.txt" % lang)
        if not os.path.isfile(dict_file):
            raise KDConfigError("--data: no dictionary %s" % dict_file)
    parser = options.get_generation_parser(default_task="translation")
    argv = [data, "--task", "translation", "--source-lang", source_lang, "--target-lang", target_lang]
    args = options.parse_args_and_arch(parser, argv + [str(a) for a in extra])
    return convert_namespace_to_omegaconf(args)


def setup_task(cfg):
    """The stock ``translation`` task of a :func:`fairseq_config` config (loads the dictionaries)."""
    return tasks.setup_task(cfg.task)


def load_split(task, split):
    """Load ``split`` into ``task`` and return it, or one clear error naming the missing files."""
    try:
        task.load_dataset(split)
    except FileNotFoundError:
        raise KDConfigError("--split: no %s split in %s (expected %s.%s-%s.%s.{bin,idx})" % (
            split, task.cfg.data, split, task.cfg.source_lang, task.cfg.target_lang, task.cfg.source_lang)) from None
    return task.dataset(split)


# ---------------------------------------------------------------------------------------------- teacher


def load_ensemble(spec, task, flag="--path", cuda=False):
    """The checkpoints in ``spec`` (``A.pt[:B.pt...]``) as eval-mode models for ``task``, and their paths
    (kd_plugin.teacher.load_members: same checks and errors as the online teacher), on GPU if ``cuda``."""
    members, paths = load_members(spec, task, flag)
    return [m.cuda() for m in members] if cuda else members, paths


def cli_dispatch(prog, run, get_parser, merge, get_merge_parser, argv=None):
    """``prog ...`` runs ``run``; ``prog merge ...`` runs ``merge`` (each through :func:`run_cli`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        run_cli(merge, get_merge_parser().parse_args(argv[1:]), prog + " merge")
    else:
        run_cli(run, get_parser().parse_args(argv), prog)


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def teacher_info(paths):
    """Metadata identifying the teacher: absolute paths and sha256 of the checkpoint files."""
    return [{"path": os.path.abspath(p), "sha256": file_sha256(p)} for p in paths]


# ---------------------------------------------------------------------------------------------- sharding


def shard_range(n, num_shards, shard_id):
    """Shard ``shard_id`` of ``num_shards``: indices [floor(n I / N), floor(n (I+1) / N)) of ``n``."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


class IndexRangeDataset(BaseWrapperDataset):
    """``dataset`` batched over the indices in [lo, hi) only; sample ids stay those of the full split.

    The order is the full split's order restricted to the range, so a shard sees its sentences in the
    same relative order as an unsharded run.
    """

    def __init__(self, dataset, lo, hi):
        super().__init__(dataset)
        self.lo, self.hi = lo, hi

    def ordered_indices(self):
        indices = self.dataset.ordered_indices()
        return indices[(indices >= self.lo) & (indices < self.hi)]


def batch_iterator(task, dataset, models, index_range, max_tokens=None, batch_size=None, seed=1):
    """fairseq's batches of ``dataset`` restricted to ``index_range``, in fixed (unshuffled) order.

    Sentences too long for the models are an error (never silently skipped: the output must cover
    every index).
    """
    dataset = IndexRangeDataset(dataset, *index_range)
    max_positions = utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models])
    try:
        itr = task.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
                                      max_positions=max_positions, ignore_invalid_inputs=False, seed=seed,
                                      disable_iterator_cache=True)
    except Exception as e:  # fairseq raises a bare Exception for over-long sentences
        if not str(e).startswith("Size of sample"):
            raise
        raise KDConfigError("--data: %s is longer than the max (source, target) positions %s of the "
                            "task and the teacher" % (str(e).split(" is invalid")[0], max_positions)) from None
    return itr.next_epoch_itr(shuffle=False)


class Progress:
    """Logs ``done/total sentences, sents/s`` every ``interval`` batches and a summary at the end."""

    def __init__(self, what, total, interval):
        self.what, self.total, self.interval = what, total, interval
        self.done = self.batches = 0
        self.start = time.perf_counter()

    @property
    def rate(self):
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, sentences):
        self.done += sentences
        self.batches += 1
        if self.batches % self.interval == 0:
            logger.info("%s: %d/%d sentences (%.1f%%), %.1f sents/s", self.what, self.done, self.total,
                        100.0 * self.done / max(self.total, 1), self.rate)

    def finish(self):
        elapsed = time.perf_counter() - self.start
        logger.info("%s: %d sentences in %.1f s (%.1f sents/s)", self.what, self.done, elapsed, self.rate)


# ---------------------------------------------------------------------------------------------- output


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicOutput:
    """The files ``prefix + suffix`` for each suffix, written all together or not at all.

    Construction refuses existing output (unless ``overwrite``) before any work is done. Inside
    ``with out:`` the caller writes ``out.tmp_prefix + suffix`` (in a temporary directory
    ``.{name}.tmp.{host}.{pid}`` next to the output, so the renames stay on one file system).
    On a clean exit the files are renamed into place, the last suffix last: it is the commit marker
    (for an indexed dataset, ``.idx``: fairseq loads nothing without it). With ``overwrite`` the old
    marker is removed first, so a crash mid-commit never leaves a marker with mixed files. The renames
    run with SIGINT/SIGTERM/SIGHUP blocked. On an exception the temporary directory is removed; a
    killed run leaves only its temporary directory, which the next run for the same prefix removes
    (when its process is gone) and which readers never look at.
    """

    def __init__(self, prefix, suffixes, overwrite=False, flag="--out"):
        self.prefix, self.suffixes, self.overwrite, self.flag = prefix, list(suffixes), overwrite, flag
        self.dir, self.name = os.path.split(os.path.abspath(prefix))
        self.tmp_dir = os.path.join(self.dir, ".%s.tmp.%s.%d" % (self.name, socket.gethostname(), os.getpid()))
        self.tmp_prefix = os.path.join(self.tmp_dir, self.name)
        self.check()

    @property
    def files(self):
        return [self.prefix + s for s in self.suffixes]

    def check(self):
        existing = [f for f in self.files if os.path.lexists(f)]
        if existing and not self.overwrite:
            raise KDConfigError("%s: %s already exists (pass --overwrite to replace it)" % (self.flag, existing[0]))

    def _remove_stale_temps(self):
        pattern = re.compile(r"^\.%s\.tmp\.(?P<host>.+)\.(?P<pid>\d+)$" % re.escape(self.name))
        for entry in os.listdir(self.dir):
            m = pattern.match(entry)
            if m and m.group("host") == socket.gethostname() and not _pid_alive(int(m.group("pid"))):
                logger.info("removing %s (left by an interrupted run)", os.path.join(self.dir, entry))
                shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)

    def __enter__(self):
        os.makedirs(self.dir, exist_ok=True)
        self._remove_stale_temps()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.commit()
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False

    def commit(self):
        self.check()  # someone else may have written the output meanwhile
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            marker = self.files[-1]
            if os.path.lexists(marker):
                os.remove(marker)
            for suffix, final in zip(self.suffixes, self.files):
                os.replace(self.tmp_prefix + suffix, final)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KDConfigError("cannot read metadata %s (%s)" % (path, e)) from None


# ---------------------------------------------------------------------------------------------- merging


def shard_prefix(prefix, shard_id, num_shards):
    """Where shard I of N of ``prefix`` (``DIR/name``) is written: ``DIR/shards/name.shard{I}of{N}``."""
    directory, name = os.path.split(prefix)
    return os.path.join(directory, SHARDS_DIR, "%s.shard%dof%d" % (name, shard_id, num_shards))


def find_shards(out_dir, name_filter=lambda name: True):
    """The shard prefixes in ``out_dir/shards`` for the one output name accepted by ``name_filter``.

    Returns (name, prefixes ordered by shard id). Errors: no shards, several candidate names, mixed
    shard counts, missing shards (each named).
    """
    shard_dir = os.path.join(out_dir, SHARDS_DIR)
    found = {}
    for entry in sorted(os.listdir(shard_dir)) if os.path.isdir(shard_dir) else []:
        m = _SHARD_RE.match(entry)
        if m and name_filter(m.group("name")):
            found.setdefault(m.group("name"), {}).setdefault(int(m.group("num")), set()).add(int(m.group("id")))
    if not found:
        raise KDConfigError("no shard files (*.shardIofN.idx) in %s" % shard_dir)
    if len(found) > 1:
        raise KDConfigError("shards of several outputs in %s (%s); pass --source-lang/--target-lang"
                            % (shard_dir, ", ".join(sorted(found))))
    (name, by_num), = found.items()
    if len(by_num) > 1:
        raise KDConfigError("%s has shards of different --num-shards (%s) in %s"
                            % (name, ", ".join(map(str, sorted(by_num))), shard_dir))
    (num, ids), = by_num.items()
    prefixes = [shard_prefix(os.path.join(out_dir, name), i, num) for i in range(num)]
    missing = [p for i, p in enumerate(prefixes) if i not in ids]
    if missing:
        raise KDConfigError("missing %d of %d shards, e.g. %s.{bin,idx}" % (len(missing), num, missing[0]))
    return name, prefixes


def merge_shard_metas(metas, files, ignore=SHARD_KEYS):
    """The metadata of the merged output; checks the shards agree and cover [0, split_size) in order.

    Each shard meta holds ``split_size``, ``range`` [lo, hi) and ``count``; every key not in ``ignore``
    (which must include :data:`SHARD_KEYS`) must be equal across shards. Ignored keys other than
    SHARD_KEYS are taken from the first shard.
    """
    first = metas[0]
    common = {k: v for k, v in first.items() if k not in SHARD_KEYS}
    expected_lo = 0
    for meta, path in zip(metas, files):
        for key in sorted((set(common) | set(meta)) - set(ignore)):
            if meta.get(key) != common.get(key):
                raise KDConfigError("%s differs between shards: %r in %s, %r in %s"
                                    % (key, common.get(key), files[0], meta.get(key), path))
        lo, hi = meta["range"]
        if lo != expected_lo or meta["count"] != hi - lo:
            raise KDConfigError("%s covers indices [%d, %d) with %d sentences, expected to start at %d"
                                % (path, lo, hi, meta["count"], expected_lo))
        expected_lo = hi
    if expected_lo != first["split_size"]:
        raise KDConfigError("the shards cover [0, %d) but the split has %d sentences"
                            % (expected_lo, first["split_size"]))
    return dict(common, count=expected_lo, range=[0, expected_lo], shard={"merged_from": len(metas)})
