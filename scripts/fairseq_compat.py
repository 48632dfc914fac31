#!/usr/bin/env python
"""Install-time compatibility edits for the stock fairseq 0.12.2 sdist (see README, "Compatibility fixes").

Each edit is a textual patch of one file of the installed fairseq. The step is idempotent (a file
already patched is left alone) and verified: it exits non-zero naming the file when an edit did not
land, and finally imports fairseq's config and checks the three fixes in a fresh interpreter.

1. Python 3.11 rejects ``x: FooConfig = FooConfig()`` dataclass defaults ("mutable default").
   We rewrite them to ``x: FooConfig = field(default=FooConfig)`` (omegaconf expands the class);
   ``default_factory`` would not do: fairseq's startup then trips over ``_MISSING_TYPE``.
2. torch >= 2.6 defaults ``torch.load(weights_only=True)``: fairseq checkpoints hold an
   ``argparse.Namespace`` and omegaconf objects, so every reload fails. We pass ``weights_only=False``
   (fairseq checkpoints are trusted files written by fairseq itself).
3. The encoder-layer "fast path" (``torch._transformer_encoder_layer_fwd`` on nested tensors) raises
   ``Mask Type should be defined`` on padded batches of an eval-mode model. We disable the fast path.
4. The encoder layers keep copies of their weights for that fast path as ``nn.Parameter`` s that never
   get a gradient, so ``--ddp-backend pytorch_ddp`` (the default) stops at the second update unless
   ``--find-unused-parameters``. We set ``requires_grad=False`` on them (they stay in the state dict).
"""
import importlib.util
import os
import re
import subprocess
import sys

MARK = "# kd-plugin compat"


def fairseq_dir():
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fairseq_compat: fairseq is not installed in %s" % sys.executable)
    return list(spec.submodule_search_locations)[0]


def _dataclass_defaults(text):
    # `    name: FooConfig = FooConfig()` and `field(default=FooConfig())`
    text = re.sub(r"^(\s+\w+: (\w+Config)) = \2\(\)\s*$", r"\1 = field(default=\2)", text, flags=re.M)
    return re.sub(r"field\(default=(\w+Config)\(\)\)", r"field(default=\1)", text)


def _weights_only(text):
    return re.sub(r"torch\.load\(\n?(\s*)f,", r"torch.load(\n\1f, weights_only=False,", text)


def _no_fast_path(text):
    return text.replace("self.can_use_fastpath = (", "self.can_use_fastpath = False and (  %s" % MARK, 1)


BT_COPIES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
             "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
FROZEN = "        for _p in (%s):  %s bt\n            _p.requires_grad_(False)\n" % (
    ", ".join("self." + n for n in BT_COPIES), MARK)


def _frozen_bt_copies(text):
    anchor = "        self.fc2_bias = torch.nn.Parameter(torch.zeros(self.fc2.bias.shape))\n"
    return text.replace(anchor, anchor + FROZEN, 1)


EDITS = [
    ("dataclass/configs.py", _dataclass_defaults, lambda t: not re.search(r"= \w+Config\(\)\s*$", t, re.M)),
    ("models/transformer/transformer_config.py", _dataclass_defaults,
     lambda t: not re.search(r"= \w+Config\(\)|default=\w+Config\(\)", t)),
    ("checkpoint_utils.py", _weights_only,
     lambda t: t.count("weights_only=False") >= 2),
    ("modules/transformer_layer.py", _no_fast_path, lambda t: "False and (  " + MARK in t),
    ("modules/transformer_layer.py", _frozen_bt_copies, lambda t: MARK + " bt" in t),
]

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


def main():
    root = fairseq_dir()
    for rel, edit, landed in EDITS:
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
            for pyc in os.listdir(os.path.join(os.path.dirname(path), "__pycache__")) if os.path.isdir(
                    os.path.join(os.path.dirname(path), "__pycache__")) else []:
                if pyc.startswith(os.path.basename(path)[:-3] + "."):
                    os.remove(os.path.join(os.path.dirname(path), "__pycache__", pyc))
            print("fairseq_compat: patched %s" % rel)
    r = subprocess.run([sys.executable, "-c", CHECK])
    if r.returncode != 0:
        sys.exit("fairseq_compat: verification failed (see above)")


if __name__ == "__main__":
    main()
