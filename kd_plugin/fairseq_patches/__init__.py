"""Every change kd-plugin makes to fairseq 0.12.2, in one place; :func:`apply` makes them all (once, when the
plugin is imported: kd_plugin/__init__.py).

============================  ==================================================  ==================================
module                        fairseq 0.12.2 code it changes                      why
============================  ==================================================  ==================================
:mod:`.fixes`                 checkpoint_utils, modules/transformer_layer,        compatibility with Python 3.11 and
                              models/distributed_fairseq_model, data/iterators    torch >= 2.6 (docs/COMPAT.md)
:mod:`.cli_errors`            ``main`` of the imported ``fairseq_cli`` modules    KDConfigError: one line, exit 2
:mod:`.criterion_state`       ``Trainer.state_dict`` / ``load_checkpoint``        criterion buffers survive a resume
:mod:`.retired_modes`         the command line, ``criterions.build_criterion``,   retired modes refused in one line
                              ``Trainer.load_checkpoint``
============================  ==================================================  ==================================

Each module's docstring gives its reason; each patch is idempotent. :data:`.fixes.FIXES` is also what
``make setup`` applies to the installed fairseq files (scripts/fairseq_compat.py; why some fixes need both
forms: the docstring of :mod:`.fixes`). All of them are written against fairseq 0.12.2
(:data:`.fixes.FAIRSEQ_VERSION`); another version gets a warning, not a refusal.
"""
import functools
import logging

from kd_plugin.fairseq_patches import cli_errors, criterion_state, fixes, retired_modes

logger = logging.getLogger("kd_plugin")


@functools.lru_cache(maxsize=None)
def apply():
    import fairseq

    if fairseq.__version__ != fixes.FAIRSEQ_VERSION:
        logger.warning("kd-plugin patches fairseq %s; this is fairseq %s (docs/COMPAT.md)",
                       fixes.FAIRSEQ_VERSION, fairseq.__version__)
    for fix in fixes.FIXES:
        if fix.patch is not None:
            fix.patch()
    cli_errors.apply()
    criterion_state.apply()
    retired_modes.apply()
