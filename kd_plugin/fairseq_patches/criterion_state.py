"""Checkpointing of criterion state that fairseq 0.12.2's Trainer would drop.

fairseq saves ``criterion.state_dict()`` only when the criterion has parameters (hybrid_kd's learned gate);
buffers of a criterion without parameters (token_kd's or hybrid_kd's --kd-select global queue) would be lost
on resume. We store them in the checkpoint's ``extra_state`` under ``kd_criterion`` (:data:`KEY`) in
``Trainer.state_dict`` and restore them in ``Trainer.load_checkpoint``. A criterion with parameters is
untouched (fairseq handles it), and so is a checkpoint without the entry.
"""
import functools

KEY = "kd_criterion"
_MARK = "_kd_criterion_state"


def _has_parameters(module):
    return next(module.parameters(), None) is not None


def apply():
    from fairseq.trainer import Trainer

    if getattr(Trainer, _MARK, False):
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
        extra = load_checkpoint(self, *args, **kwargs)
        if extra and KEY in extra and not _has_parameters(self.get_criterion()):
            self.get_criterion().load_state_dict(extra[KEY])
        return extra

    Trainer.state_dict = state_dict_with_buffers
    Trainer.load_checkpoint = load_checkpoint_with_buffers
    setattr(Trainer, _MARK, True)
