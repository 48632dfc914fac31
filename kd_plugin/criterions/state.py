"""Checkpointing of criterion state that fairseq's Trainer would drop, and resumes of retired modes.

fairseq saves ``criterion.state_dict()`` only when the criterion has parameters (hybrid_kd's learned gate);
buffers of a criterion without parameters (token_kd's or hybrid_kd's --kd-select global queue) would be lost
on resume. We store them in the checkpoint's ``extra_state`` under
``kd_criterion`` and restore them in ``Trainer.load_checkpoint``. A criterion with parameters is untouched
(fairseq handles it), and so is a checkpoint without the entry.

A checkpoint trained with a mode that left the package (kd_plugin.retired) is refused on load with one line
naming the mode, before fairseq tries to load its criterion state.
"""
import contextlib
import functools

KEY = "kd_criterion"


def _has_parameters(module):
    return next(module.parameters(), None) is not None


@contextlib.contextmanager
def _refusing_retired_modes():
    """While active, fairseq's checkpoint reader refuses a checkpoint whose criterion used a retired mode."""
    from fairseq import checkpoint_utils

    from kd_plugin.retired import check_criterion_cfg

    read = checkpoint_utils.load_checkpoint_to_cpu

    @functools.wraps(read)
    def read_checked(path, *args, **kwargs):
        state = read(path, *args, **kwargs)
        cfg = state.get("cfg") if isinstance(state, dict) else None
        if cfg is not None and cfg.get("criterion") is not None:
            check_criterion_cfg(cfg["criterion"], path)
        return state

    checkpoint_utils.load_checkpoint_to_cpu = read_checked
    try:
        yield
    finally:
        checkpoint_utils.load_checkpoint_to_cpu = read


def patch_trainer():
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_kd_criterion_state", False):
        return
    state_dict, load_checkpoint = Trainer.state_dict, Trainer.load_checkpoint

    @functools.wraps(state_dict)
    def state_dict_with_buffers(self):
        st = state_dict(self)
        crit = self.get_criterion()
        if not _has_parameters(crit) and next(crit.buffers(), None) is not None:
            st["extra_state"][KEY] = crit.state_dict()
        return st

    @functools.wraps(load_checkpoint)
    def load_checkpoint_with_buffers(self, *args, **kwargs):
        with _refusing_retired_modes():
            extra = load_checkpoint(self, *args, **kwargs)
        if extra and KEY in extra and not _has_parameters(self.get_criterion()):
            self.get_criterion().load_state_dict(extra[KEY])
        return extra

    Trainer.state_dict = state_dict_with_buffers
    Trainer.load_checkpoint = load_checkpoint_with_buffers
    Trainer._kd_criterion_state = True
