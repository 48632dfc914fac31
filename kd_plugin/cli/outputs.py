"""Output files of kd-plugin's command-line tools: written atomically, and sharded runs merged.

* :class:`AtomicOutput` -- output files written under temporary names, renamed into place at the end.
* :func:`shard_prefix`, :func:`find_shards`, :func:`merge_shard_metas` -- shard files live in
  ``DIR/shards/{name}.shard{I}of{N}.*``; merging checks that the shards agree and cover the split exactly.
* :func:`write_json`, :func:`read_json` -- metadata files.
"""
import json
import logging
import os
import re
import shutil
import signal
import socket

from kd_plugin.checks import KDConfigError

logger = logging.getLogger("kd_plugin.cli")

SHARDS_DIR = "shards"
_SHARD_RE = re.compile(r"^(?P<name>.+)\.shard(?P<id>\d+)of(?P<num>\d+)\.idx$")
# metadata keys that legitimately differ between the shards of one run
SHARD_KEYS = ("count", "range", "shard")


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
