"""The compatibility fixes for fairseq 0.12.2 on Python 3.11 and torch >= 2.6 (docs/COMPAT.md), each defined once.

:data:`FIXES` is the one table. Each fix has up to two forms of the same change:

* ``edits``: textual edits of the installed fairseq files, made by ``make setup``
  (scripts/fairseq_compat.py: idempotent, verified). They hold for every fairseq command, also those that
  never load the plugin: a stock ``fairseq-train`` of a teacher, ``fairseq-generate`` without ``--user-dir``.
* ``patch``: the same fix made in memory when the plugin is imported (kd_plugin.fairseq_patches.apply), so the
  plugin also works on a fairseq 0.12.2 installed without that step.

Why two mechanisms and not one: the dataclass defaults (fix 1) break ``import fairseq`` itself, before any
plugin code can run, so only an edit of the file fixes them; fixes 2 to 4 break commands that never import
the plugin, so they need the edit too, and keep the patch for other installs; fixes 5 and 6 were only ever
needed by the plugin's own runs (multi-process CPU training, stopping mid-epoch), so they are patches only.

Every edit and patch is guarded: applying it twice, or to a fairseq already fixed, changes nothing. This module
imports only the standard library and torch at the top (fairseq inside the functions): the install step loads
it by path, while ``import fairseq`` may still fail.
"""
import collections
import functools
import re
import types

import torch

FAIRSEQ_VERSION = "0.12.2"  # the release every edit and patch here is written against
MARK = "# kd-plugin compat"  # in the installed files: this line was edited
_APPLIED = "_kd_plugin_patched"  # in memory: this object was patched

Edit = collections.namedtuple("Edit", "file edit landed")  # file under fairseq/; edit(text) -> text; landed(text)
Fix = collections.namedtuple("Fix", "name edits patch")  # patch: None for an install-time-only fix


# 1. dataclass defaults (install time only) ---------------------------------------------------------------------

def dataclass_defaults(text):
    """Python 3.11 rejects ``x: FooConfig = FooConfig()`` dataclass defaults ("mutable default") when fairseq
    0.12.2's ``dataclass/configs.py`` and ``models/transformer/transformer_config.py`` are imported. Rewritten to
    ``x: FooConfig = field(default=FooConfig)`` (omegaconf expands the class); ``default_factory`` would not
    do: fairseq's start-up then trips over ``_MISSING_TYPE``. An import-time failure: install time only."""
    # `    name: FooConfig = FooConfig()` and `field(default=FooConfig())`
    text = re.sub(r"^(\s+\w+: (\w+Config)) = \2\(\)\s*$", r"\1 = field(default=\2)", text, flags=re.M)
    return re.sub(r"field\(default=(\w+Config)\(\)\)", r"field(default=\1)", text)


# 2. checkpoint loading ------------------------------------------------------------------------------------------

def weights_only(text):
    """The edit of :func:`patch_checkpoint_load`: fairseq 0.12.2's two ``torch.load(f, ...)`` calls in
    ``checkpoint_utils.py`` get ``weights_only=False``."""
    return re.sub(r"torch\.load\(\n?(\s*)f,", r"torch.load(\n\1f, weights_only=False,", text)


class _TorchWithTrustedLoad(types.ModuleType):
    """Stands in for ``torch`` inside fairseq.checkpoint_utils: ``load`` defaults to weights_only=False."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def patch_checkpoint_load():
    """torch >= 2.6 loads with ``weights_only=True``, and fairseq 0.12.2 checkpoints pickle an
    ``argparse.Namespace`` and omegaconf objects, so every reload (resume, generate, teacher) fails. fairseq's
    checkpoint reader loads with ``weights_only=False``: its checkpoints are trusted files fairseq wrote."""
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchWithTrustedLoad):
        checkpoint_utils.torch = _TorchWithTrustedLoad()


# 3. encoder fast path -------------------------------------------------------------------------------------------

def no_fast_path(text):
    """The edit of :func:`patch_encoder_fast_path` in ``modules/transformer_layer.py``."""
    return text.replace("self.can_use_fastpath = (", "self.can_use_fastpath = False and (  %s" % MARK, 1)


def patch_encoder_fast_path():
    """fairseq 0.12.2's encoder layers take torch's fast path (``torch._transformer_encoder_layer_fwd``) in
    eval mode, which raises "Mask Type should be defined" on a padded batch: fairseq-generate and every
    eval-mode teacher break. The fast path is disabled (the regular path computes the same function)."""
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase as layer

    if not getattr(layer, _APPLIED, False):
        # a read-only property: every instance, existing or future, takes the regular path
        layer.can_use_fastpath = property(lambda self: False, lambda self, value: None)
        setattr(layer, _APPLIED, True)


# 4. the fast path's weight copies -------------------------------------------------------------------------------

# the attributes of fairseq 0.12.2's TransformerEncoderLayerBase that copy its weights for the fast path
WEIGHT_COPIES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                 "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
_FROZEN = "        for _p in (%s):  %s bt\n            _p.requires_grad_(False)\n" % (
    ", ".join("self." + n for n in WEIGHT_COPIES), MARK)


def frozen_weight_copies(text):
    """The edit of :func:`patch_encoder_weight_copies` in ``modules/transformer_layer.py``."""
    anchor = "        self.fc2_bias = torch.nn.Parameter(torch.zeros(self.fc2.bias.shape))\n"
    return text.replace(anchor, anchor + _FROZEN, 1)


def patch_encoder_weight_copies():
    """fairseq 0.12.2's encoder layers hold copies of their attention and FFN weights (:data:`WEIGHT_COPIES`) as
    ``nn.Parameter`` s for the fast path (disabled by fix 3); they are rebuilt from q/k/v/fc at load and never
    get a gradient. Under ``--ddp-backend pytorch_ddp`` (fairseq's default) DDP then waits for their gradients
    and stops at the second update ("Expected to have finished reduction in the prior iteration") unless
    ``--find-unused-parameters``. With ``requires_grad=False`` fairseq's optimizer and DDP skip them; they stay
    in the state dict, so checkpoints keep their keys and load in stock fairseq."""
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase as layer

    if getattr(layer.__init__, _APPLIED, False):
        return
    init = layer.__init__

    @functools.wraps(init)
    def init_frozen_copies(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name in WEIGHT_COPIES:
            p = getattr(self, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(False)

    setattr(init_frozen_copies, _APPLIED, True)
    layer.__init__ = init_frozen_copies


# 5. pytorch_ddp on CPU (import time only) -----------------------------------------------------------------------

def patch_cpu_ddp():
    """fairseq 0.12.2's ``pytorch_ddp`` passes ``device_ids=[device_id]`` to DistributedDataParallel, which
    PyTorch refuses for a CPU module (it needs ``device_ids=None``): multi-process CPU training (and our
    distributed tests) run fairseq's default backend with ``device_ids=None`` for a CPU model."""
    from fairseq.models import distributed_fairseq_model as dfm

    ddp = dfm.DistributedDataParallel
    if getattr(ddp, _APPLIED, False):
        return

    @functools.wraps(ddp)
    def ddp_on_any_device(module, *args, **kwargs):
        if next(module.parameters()).device.type == "cpu":
            kwargs["device_ids"] = kwargs["output_device"] = None
        return ddp(module, *args, **kwargs)

    setattr(ddp_on_any_device, _APPLIED, True)
    dfm.DistributedDataParallel = ddp_on_any_device


# 6. clean shutdown (import time only) ---------------------------------------------------------------------------

def _stop_background_consumers(timeout=10.0):
    """Ask each of fairseq's BackgroundConsumer threads to stop after its current batch and drain its queue
    until it exits (at most ``timeout`` seconds in all)."""
    import queue
    import threading
    import time

    from fairseq.data.iterators import BackgroundConsumer

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if not isinstance(thread, BackgroundConsumer):
            continue
        thread._max_len = 0  # its loop breaks after the batch in hand
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                thread._queue.get(timeout=0.05)
            except queue.Empty:
                pass


def patch_clean_shutdown():
    """fairseq 0.12.2's BufferedIterator collates batches in a daemon thread. When training stops mid-epoch
    (--max-update), that thread may still be inside torch code when Python finalizes, and the process aborts
    after "done training" with "terminate called without an active exception" (exit 134), seen here under CPU
    load. An exit hook lets those threads finish their batch first."""
    import atexit

    if not getattr(_stop_background_consumers, _APPLIED, False):
        atexit.register(_stop_background_consumers)
        setattr(_stop_background_consumers, _APPLIED, True)


FIXES = (
    Fix("dataclass defaults", (
        Edit("dataclass/configs.py", dataclass_defaults, lambda t: not re.search(r"= \w+Config\(\)\s*$", t, re.M)),
        Edit("models/transformer/transformer_config.py", dataclass_defaults,
             lambda t: not re.search(r"= \w+Config\(\)|default=\w+Config\(\)", t))), None),
    Fix("checkpoint loading",
        (Edit("checkpoint_utils.py", weights_only, lambda t: t.count("weights_only=False") >= 2),),
        patch_checkpoint_load),
    Fix("encoder fast path",
        (Edit("modules/transformer_layer.py", no_fast_path, lambda t: "False and (  " + MARK in t),),
        patch_encoder_fast_path),
    Fix("fast-path weight copies under DDP",
        (Edit("modules/transformer_layer.py", frozen_weight_copies, lambda t: MARK + " bt" in t),),
        patch_encoder_weight_copies),
    Fix("pytorch_ddp on CPU", (), patch_cpu_ddp),
    Fix("clean shutdown", (), patch_clean_shutdown),
)
