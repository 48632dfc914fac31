"""The step runner of every driver: cached steps under WORK, each a function or subprocesses with a log per
command; the repository's paths, its console scripts and the file helpers (atomic writes, sha256).

A step's done-marker WORK/done/STEP.json records its wall time and command; delete it (or the step's output)
to redo the step.
"""
import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from kdexp import warm

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the drivers; kdexp/ is in it
REPO = os.path.dirname(EXAMPLES)
BIN = os.path.dirname(sys.executable)  # the venv's console scripts live next to its python


class StepFailed(RuntimeError):
    pass


class Pipeline:
    """Runs the cached steps; ``self.seconds[step]`` is the wall time of each step (cached runs included),
    ``self.reused`` the steps skipped because an earlier run made them."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        self.t0 = time.time()
        self.seconds, self.reused = {}, []
        self.lock = threading.Lock()
        # unbuffered: stdout lines (fairseq-generate's H-i) never get split by stderr lines
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        for sub in ("logs", "done"):
            os.makedirs(self.path(sub), exist_ok=True)

    def with_threads(self, threads):
        """The same pipeline (shared step times) whose commands run with ``threads`` OpenMP threads."""
        view = copy.copy(self)
        view.env = dict(self.env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return view

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def progress(self, step, message):
        with self.lock:  # students report from parallel threads
            print("[%7.1fs] %-18s %s" % (time.time() - self.t0, step, message), flush=True)

    def cached(self, step):
        """The done-marker of ``step`` ({"seconds": ..., "cmd": ...}) or None."""
        marker = self.path("done", step + ".json")
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            return json.load(f)

    def step(self, step, fn, cmd=None):
        """Run ``fn()`` once: skipped when ``step``'s done-marker exists; the marker records time and command."""
        done = self.cached(step)
        if done is not None:
            self.seconds[step] = done["seconds"]
            self.reused.append(step)
            note = "" if cmd is None or done.get("cmd") in (None, cmd) else " (made with other arguments; delete %s)" \
                % self.path("done", step + ".json")
            self.progress(step, "cached (%.0fs)%s" % (done["seconds"], note))
            return
        self.progress(step, "running ...")
        start = time.time()
        fn()
        self.seconds[step] = time.time() - start
        with open(self.path("done", step + ".json"), "w") as f:
            json.dump({"seconds": self.seconds[step], "cmd": cmd}, f)
        self.progress(step, "done in %.0fs" % self.seconds[step])

    def run(self, step, *stages):
        """Step ``step``: each stage is a list of commands run in parallel (one command: a plain list);
        stages run one after the other. Output goes to WORK/logs/STEP.log (STEP.I.log for parallel ones)."""
        stages = [[cmd] if isinstance(cmd[0], str) else cmd for cmd in stages]
        stages = [[[str(c) for c in cmd] for cmd in stage] for stage in stages]
        self.step(step, lambda: [self.subprocesses(step, stage) for stage in stages], stages)

    def subprocesses(self, step, cmds, env=None):
        """Run ``cmds`` concurrently (with ``env``, default the pipeline's); raise StepFailed (after printing the
        log's tail) if one fails. With KDEXP_WARM=1 the venv's fairseq-*/kd-* console scripts run in forks of a
        warm process (kdexp/warm.py: the same command, output and exit status, without importing torch and
        fairseq again; for toy runs such as the tests', whose cost is mostly that import)."""
        procs = []
        for i, cmd in enumerate(cmds):
            log = self.path("logs", "%s.log" % step if len(cmds) == 1 else "%s.%d.log" % (step, i))
            with open(log, "w") as f:
                f.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
                f.flush()
                if warm_script(cmd):
                    pid = warm.submit(os.path.basename(cmd[0]), cmd[1:], env or self.env, REPO, log, append=True)
                    procs.append((lambda pid=pid, log=log: warm.wait(pid, log), log))
                    continue
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env or self.env)
                procs.append((proc.wait, log))
        failed = [(wait(), log) for wait, log in procs]
        for rc, log in failed:
            if rc != 0:
                with open(log, errors="replace") as f:
                    sys.stderr.write("".join(f.readlines()[-30:]))
                raise StepFailed("step %s failed (exit %d); full log: %s" % (step, rc, log))


def warm_script(cmd):
    """Whether ``cmd`` runs in a fork of the warm process: KDEXP_WARM=1 and a fairseq-*/kd-* console script."""
    return os.environ.get("KDEXP_WARM") == "1" and os.path.dirname(cmd[0]) == BIN and \
        os.path.basename(cmd[0]) in warm.ENTRIES


def tool(name):
    """A console script of the venv that runs this file."""
    exe = os.path.join(BIN, name)
    if not os.path.isfile(exe):
        raise StepFailed("%s not found next to %s (run `make setup`)" % (name, sys.executable))
    return exe


def repo_relative(arg):
    """A path under the repository as a relative one (commands in records and reports)."""
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def write_lines(path, lines):
    """Write atomically (temp file + rename) so an interrupted run never leaves a half file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(path + ".tmp", path)


def sha256(path):
    """The file's sha256 (hex): which teacher checkpoint a record distils."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
