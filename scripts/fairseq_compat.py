#!/usr/bin/env python
"""Install-time compatibility edits for the stock fairseq 0.12.2 sdist (``make setup``; docs/COMPAT.md).

Applies the ``edits`` of every fix in kd_plugin/fairseq_patches/fixes.py (the one table of fixes; the plugin
applies their in-memory ``patch`` form at import) to the installed fairseq files. Idempotent (a file already
edited is left alone) and verified: it exits non-zero naming the file when an edit did not land, and finally
imports fairseq in a fresh interpreter and checks the fixes.

fixes.py is loaded by its path, not imported as ``kd_plugin.fairseq_patches.fixes``: this runs before the
plugin is installed, and importing the package kd_plugin imports fairseq, which fails before these edits.
"""
import importlib.util
import os
import subprocess
import sys

FIXES_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "kd_plugin", "fairseq_patches", "fixes.py")


def load_fixes():
    spec = importlib.util.spec_from_file_location("kd_plugin_fairseq_fixes", FIXES_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fairseq_dir():
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fairseq_compat: fairseq is not installed in %s" % sys.executable)
    return list(spec.submodule_search_locations)[0]


CHECK = r"""
import torch, fairseq.dataclass.configs as C, fairseq.checkpoint_utils as cu
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from fairseq.models.transformer import TransformerConfig
cfg = TransformerConfig()
layer = TransformerEncoderLayerBase(cfg)
assert not layer.can_use_fastpath, "encoder fast path still enabled"
assert not any(p.requires_grad for n, p in layer.named_parameters(recurse=False)), "BT copies still trainable"
import argparse, tempfile, os
p = os.path.join(tempfile.mkdtemp(), "c.pt")
hist = [{"criterion_name": "c", "optimizer_name": "o", "lr_scheduler_state": {"best": 0}, "num_updates": 0}]
torch.save({"ns": argparse.Namespace(a=1), "model": {}, "cfg": None, "optimizer_history": hist,
            "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None}}, p)
assert cu.load_checkpoint_to_cpu(p)["ns"].a == 1
print("fairseq_compat: ok (fairseq %s, torch %s)" % (__import__("fairseq").__version__, torch.__version__))
"""


def _remove_bytecode(path):
    cache = os.path.join(os.path.dirname(path), "__pycache__")
    stem = os.path.basename(path)[:-3] + "."
    for pyc in os.listdir(cache) if os.path.isdir(cache) else []:
        if pyc.startswith(stem):
            os.remove(os.path.join(cache, pyc))


def main():
    root = fairseq_dir()
    for fix in load_fixes().FIXES:
        for rel, edit, landed in fix.edits:
            path = os.path.join(root, rel)
            with open(path) as f:
                text = f.read()
            new = edit(text) if not landed(text) else text
            if not landed(new):
                sys.exit("fairseq_compat: edit of %s did not land (unexpected fairseq source?)" % path)
            if new != text:
                tmp = path + ".kdtmp"
                with open(tmp, "w") as f:
                    f.write(new)
                os.replace(tmp, path)
                _remove_bytecode(path)
                print("fairseq_compat: patched %s (%s)" % (rel, fix.name))
    r = subprocess.run([sys.executable, "-c", CHECK])
    if r.returncode != 0:
        sys.exit("fairseq_compat: verification failed (see above)")


if __name__ == "__main__":
    main()
