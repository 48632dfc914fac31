"""Import-time fixes for stock fairseq 0.12.2 on torch >= 2.6 (see README, "Compatibility fixes").

``make setup`` also patches the installed fairseq files (scripts/fairseq_compat.py); these runtime
patches make the plugin work on any other fairseq 0.12.2 install. Both are guarded: applying them
twice, or on an already fixed fairseq, changes nothing.
"""
import functools
import types

import torch

_APPLIED = "_kd_plugin_patched"


class _TorchWithTrustedLoad(types.ModuleType):
    """Stands in for ``torch`` inside fairseq.checkpoint_utils: ``load`` defaults to weights_only=False.

    fairseq checkpoints pickle an argparse.Namespace and omegaconf objects, which torch >= 2.6's
    default ``weights_only=True`` refuses.
    """

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def patch_checkpoint_load():
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchWithTrustedLoad):
        checkpoint_utils.torch = _TorchWithTrustedLoad()


def patch_encoder_fast_path():
    """Disable the encoder-layer fast path ("Mask Type should be defined" on padded eval batches)."""
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase as layer

    if not getattr(layer, _APPLIED, False):
        # a read-only property: every instance, existing or future, takes the regular path
        layer.can_use_fastpath = property(lambda self: False, lambda self, value: None)
        setattr(layer, _APPLIED, True)


_BT_COPIES = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
               "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def is_weight_copy(name):
    """Whether a model parameter / state-dict key is one of those copies (``encoder.layers.N.fc1_weight``...):
    they are not model parameters and are left out of parameter counts."""
    layer, _, attr = name.rpartition(".")
    return attr in _BT_COPIES and layer.split(".")[-2:-1] == ["layers"]


def patch_encoder_bt_copies():
    """Keep the encoder layers' BetterTransformer weight copies out of the trainable parameters.

    fairseq 0.12.2's encoder layers hold copies of their attention and FFN weights (``in_proj_weight``,
    ``out_proj_*``, ``fc1_*``, ``fc2_*``) as ``nn.Parameter`` s for the fast path (disabled above); they are
    rebuilt from q/k/v/fc at load and never get a gradient. Under ``--ddp-backend pytorch_ddp`` (fairseq's
    default) DDP then waits for their gradients and stops at the second update ("Expected to have finished
    reduction in the prior iteration") unless ``--find-unused-parameters``. With ``requires_grad=False``
    fairseq's optimizer and DDP skip them; they stay in the state dict, so checkpoints keep their keys and
    load in stock fairseq.
    """
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase as layer

    if getattr(layer.__init__, _APPLIED, False):
        return
    init = layer.__init__

    @functools.wraps(init)
    def init_frozen_copies(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name in _BT_COPIES:
            p = getattr(self, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(False)

    setattr(init_frozen_copies, _APPLIED, True)
    layer.__init__ = init_frozen_copies


def patch_cpu_ddp():
    """Let fairseq's ``pytorch_ddp`` wrap a CPU model: it passes ``device_ids=[device_id]``, which PyTorch's
    DistributedDataParallel refuses for CPU modules (they need ``device_ids=None``)."""
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


def _stop_background_consumers(timeout=10.0):
    """Let fairseq's batch-prefetch threads finish before the interpreter tears down.

    fairseq's BufferedIterator collates batches in a daemon thread. When training stops mid-epoch
    (--max-update), that thread may still be inside torch code when Python finalizes, and the process
    aborts after "done training" with "terminate called without an active exception" (exit 134), seen
    here under CPU load. We ask each such thread to stop after its current batch and drain its queue
    until it exits.
    """
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
    import atexit

    atexit.register(_stop_background_consumers)


@functools.lru_cache(maxsize=None)
def apply():
    patch_checkpoint_load()
    patch_encoder_fast_path()
    patch_encoder_bt_copies()
    patch_cpu_ddp()
    patch_clean_shutdown()
