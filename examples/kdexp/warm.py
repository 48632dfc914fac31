"""Console scripts (fairseq-*, kd-*) run in forks of one warm process (per test worker, or per driver run with
KDEXP_WARM=1: kdexp.pipeline).

Importing torch and fairseq is 3-5 s of CPU per process and most of what a toy fairseq-train run costs; the
test suite starts hundreds, a driver on a toy corpus dozens. The warm process imports torch and the fairseq
library (never fairseq_cli, whose import configures logging, nor kd_plugin, which --user-dir imports) and then
only forks: each child is one whole command, as its console script would run it (argv, the caller's environment
and working directory, stdout and stderr to a file, exit status as the interpreter maps SystemExit; torch's
intra-op threads set from the job's OMP_NUM_THREADS, which torch read once, in the warm process), so outputs and
exit statuses are those of a fresh process. Callers fall back to a fresh process for anything else.
"""
import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import entry_points

SERVER = r"""
import importlib, json, os, signal, sys, traceback
import torch, fairseq, fairseq.models, fairseq.tasks, fairseq.criterions, fairseq.sequence_generator  # noqa: F401
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped at once; each writes its own status
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        sys.stdout.write("%d\n" % pid); sys.stdout.flush()
        continue
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | (os.O_APPEND if job.get("append") else os.O_TRUNC))
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        fd = os.open(os.devnull, os.O_RDONLY); os.dup2(fd, 0); os.close(fd); sys.stdin = open(0)
        os.chdir(job["cwd"]); os.environ.clear(); os.environ.update(job["env"]); sys.argv = job["argv"]
        if job["env"].get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(job["env"]["OMP_NUM_THREADS"]))
        module, func = job["entry"].split(":")
        result = getattr(importlib.import_module(module), func)()
        code = result if isinstance(result, int) else 0 if result is None else 1
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        with open(job["out"] + ".rc.tmp", "w") as f:
            f.write(str(code))
        os.rename(job["out"] + ".rc.tmp", job["out"] + ".rc")  # whole or absent
        os._exit(code)
"""

ENTRIES = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith(("fairseq-", "kd-"))}
_lock = threading.Lock()
_server = None


def _start(env):
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=env)
        atexit.register(_server.stdin.close)
    return _server


def submit(name, args, env, cwd, out, append=False):
    """Start console script ``name`` with ``args`` in a fork of the warm process, its output to ``out`` (appended
    with ``append``); returns the child's pid (wait for it with :func:`wait`)."""
    job = {"entry": ENTRIES[name], "argv": [os.path.join(os.path.dirname(sys.executable), name)] + list(args),
           "env": env, "cwd": cwd, "out": out, "append": append}
    with _lock:
        server = _start(env)
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())


def wait(pid, out, timeout=None):
    """The exit status of the child ``pid`` started by :func:`submit` with output ``out`` (its status file
    removed); SIGKILL and subprocess.TimeoutExpired after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not os.path.exists(out + ".rc"):
            if not _alive(pid):  # killed before writing its status (the file appears just before _exit)
                time.sleep(0.2)
                if not os.path.exists(out + ".rc"):
                    with open(out, "a") as f:
                        f.write("\n[warm: the process died without a status]")
                    return -9
                break
            if deadline is not None and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired("warm child %d" % pid, timeout, _read(out))
            time.sleep(0.02)
        with open(out + ".rc") as f:
            return int(f.read())
    finally:
        for path in (out + ".rc", out + ".rc.tmp"):
            if os.path.exists(path):
                os.remove(path)


def run(name, args, env, timeout):
    """(exit status, output) of console script ``name`` with ``args`` in a fork of the warm process."""
    fd, out = tempfile.mkstemp(prefix="warm-", suffix=".log")
    os.close(fd)
    try:
        pid = submit(name, args, env, os.getcwd(), out)
        return wait(pid, out, timeout), _read(out)
    finally:
        if os.path.exists(out):
            os.remove(out)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()
