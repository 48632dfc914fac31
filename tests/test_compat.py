"""fairseq 0.12.2's compatibility fixes (kd_plugin/fairseq_patches/fixes.py, docs/COMPAT.md): the install-time
step (scripts/fairseq_compat.py) and the plugin's import-time patches."""
import os
import re
import shutil
import subprocess
import sys

import torch

from helpers import REPO

COMPAT = os.path.join(REPO, "scripts", "fairseq_compat.py")


def _py(code, **env):
    return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, **env))


def test_install_step_is_verified_and_idempotent():
    p = subprocess.run([sys.executable, COMPAT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0 and "fairseq_compat: ok" in p.stdout
    assert "patched" not in p.stdout  # already applied by make setup: a second run changes nothing


def test_install_step_fails_loudly_when_an_edit_cannot_land(tmp_path):
    """A fairseq whose source does not look like 0.12.2: the step names the file and exits non-zero."""
    import fairseq

    fake = tmp_path / "fairseq"
    shutil.copytree(os.path.dirname(fairseq.__file__), fake,
                    ignore=shutil.ignore_patterns("examples", "*.so", "__pycache__"))
    layer = fake / "modules" / "transformer_layer.py"
    text = re.sub(r"self\.can_use_fastpath = .*", "self.fast = (", layer.read_text())
    layer.write_text(text)
    p = subprocess.run([sys.executable, COMPAT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert p.returncode != 0
    assert "transformer_layer.py did not land" in p.stdout


def test_plugin_patches_at_import_on_an_unpatched_fairseq():
    """Undo the install-time fixes in memory, import the plugin, and check both fixes hold again."""
    code = r"""
import argparse, os, tempfile, torch
import fairseq.checkpoint_utils as cu
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase as L
from fairseq.models.transformer import TransformerConfig
cu.torch = torch                    # stock: torch.load(weights_only=True by default)
layer = L(TransformerConfig()); layer.can_use_fastpath = True
p = os.path.join(tempfile.mkdtemp(), "c.pt"); torch.save({"ns": argparse.Namespace(a=1)}, p)
try:
    cu.torch.load(p); raise SystemExit("expected the stock weights_only failure")
except Exception as e:
    assert "weights_only" in str(e) or "Namespace" in str(e), e
import kd_plugin, kd_plugin.fairseq_patches.fixes as c
c.patch_checkpoint_load(); c.patch_encoder_fast_path(); c.patch_encoder_fast_path()   # idempotent
assert cu.torch.load(p)["ns"].a == 1
assert layer.can_use_fastpath is False and L(TransformerConfig()).can_use_fastpath is False
print("ok")
"""
    p = _py(code)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout


def test_eval_mode_encoder_on_a_padded_batch():
    """Stock 0.12.2 raises 'Mask Type should be defined' here (fast path, eval mode, padding)."""
    import kd_plugin  # noqa: F401
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerConfig, TransformerEncoderBase
    from fairseq.modules import transformer_layer

    d = Dictionary()
    for w in "abcdef":
        d.add_symbol(w)
    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.layers = 16, 32, 2
    enc = TransformerEncoderBase(cfg, d, torch.nn.Embedding(len(d), 16, padding_idx=d.pad())).eval()
    enc.layers[0].can_use_fastpath = True
    assert [layer.can_use_fastpath for layer in enc.layers] == [False, False]
    # the plugin's property: always False, assignments (fairseq's own, in __init__ and eval) are ignored
    fast_path = transformer_layer.TransformerEncoderLayerBase.__dict__["can_use_fastpath"]
    assert isinstance(fast_path, property) and fast_path.fget(None) is False
    tokens = torch.tensor([[d.pad(), 5, 6, 2], [4, 5, 6, 2]])
    with torch.no_grad():
        out = enc(tokens, src_lengths=torch.tensor([3, 4]))
    assert out["encoder_out"][0].shape == (4, 2, 16)
    assert torch.isfinite(out["encoder_out"][0][1:]).all()
