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
    from kd_plugin.criterions.state import patch_trainer

    patch_checkpoint_load()
    patch_encoder_fast_path()
    patch_clean_shutdown()
    patch_trainer()  # not a compatibility fix: keeps parameter-less criterion state across resumes
