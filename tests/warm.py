"""Console scripts (fairseq-*, kd-*) run in forks of one warm process per test worker.

Importing torch and fairseq is 3-5 s of CPU per process and most of what a toy fairseq-train run costs; the
suite starts hundreds. The warm process imports torch and the fairseq library (never fairseq_cli, whose
import configures logging, nor kd_plugin, which --user-dir imports) and then only forks: each child is one
whole command, as its console script would run it (argv, the caller's environment and working directory,
stdout and stderr to a file, exit status as the interpreter maps SystemExit), so outputs and exit statuses
are those of a fresh process. helpers.run falls back to a fresh process for anything else.
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
        fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
        fd = os.open(os.devnull, os.O_RDONLY); os.dup2(fd, 0); os.close(fd); sys.stdin = open(0)
        os.chdir(job["cwd"]); os.environ.clear(); os.environ.update(job["env"]); sys.argv = job["argv"]
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


def run(name, args, env, timeout):
    """(exit status, output) of console script ``name`` with ``args`` in a fork of the warm process."""
    fd, out = tempfile.mkstemp(prefix="warm-", suffix=".log")
    os.close(fd)
    job = {"entry": ENTRIES[name], "argv": [os.path.join(os.path.dirname(sys.executable), name)] + args,
           "env": env, "cwd": os.getcwd(), "out": out}
    with _lock:
        server = _start(env)
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
    deadline = time.monotonic() + timeout
    try:
        while not os.path.exists(out + ".rc"):
            if not _alive(pid):  # killed before writing its status (the file appears just before _exit)
                time.sleep(0.2)
                if not os.path.exists(out + ".rc"):
                    return -9, _read(out) + "\n[warm: the process died without a status]"
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(job["argv"], timeout, _read(out))
            time.sleep(0.02)
        with open(out + ".rc") as f:
            return int(f.read()), _read(out)
    finally:
        for path in (out, out + ".rc", out + ".rc.tmp"):
            if os.path.exists(path):
                os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()
