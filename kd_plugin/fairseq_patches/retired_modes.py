"""Modes that left kd-plugin (kd_plugin.retired) refused where fairseq 0.12.2 reads a configuration.

Three places, each with one line naming the mode and the commit that last had it (exit status 2 inside a
fairseq command, through kd_plugin.fairseq_patches.cli_errors):

* the command line of a fairseq command (fairseq-train ...): a retired flag would otherwise be argparse's
  "unrecognized arguments", so it is checked when the plugin is imported (``--user-dir``, during argument
  parsing, before the flags are parsed);
* a criterion configuration, when fairseq builds the criterion from it (``fairseq.criterions.build_criterion``:
  command line, config file or a saved configuration): a retired ``--kd-gate`` value;
* a resume (``Trainer.load_checkpoint``): a checkpoint whose saved criterion used a retired mode is refused
  before fairseq loads its criterion state.

Here and in kd-gate-dump only: the loss code (kd_plugin.gate, the criteria) knows nothing of retired modes.
"""
import contextlib
import functools
import sys

from kd_plugin.checks import KDConfigError
from kd_plugin.fairseq_patches.cli_errors import exit_in_one_line, fairseq_commands
from kd_plugin.retired import check_argv, check_criterion_cfg

_MARK = "_kd_retired_modes"


def refuse_on_the_command_line():
    """Inside a fairseq command, a retired flag or ``--kd-gate`` value on its command line: one line, exit 2."""
    if fairseq_commands():
        try:
            check_argv(sys.argv[1:])
        except KDConfigError as e:
            exit_in_one_line(e)


def refuse_in_criterion_configs():
    """``fairseq.criterions.build_criterion`` (what every task's ``build_criterion`` calls) checks its config."""
    from fairseq import criterions

    build = criterions.build_criterion
    if getattr(build, _MARK, False):
        return

    @functools.wraps(build)
    def build_checked(cfg, task, *args, **kwargs):
        check_criterion_cfg(cfg)
        return build(cfg, task, *args, **kwargs)

    setattr(build_checked, _MARK, True)
    criterions.build_criterion = build_checked


@contextlib.contextmanager
def _refusing_retired_checkpoints():
    """While active, fairseq's checkpoint reader refuses a checkpoint whose criterion used a retired mode."""
    from fairseq import checkpoint_utils

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


def refuse_on_resume():
    """``Trainer.load_checkpoint`` reads the checkpoint with :func:`_refusing_retired_checkpoints` active."""
    from fairseq.trainer import Trainer

    load_checkpoint = Trainer.load_checkpoint
    if getattr(load_checkpoint, _MARK, False):
        return

    @functools.wraps(load_checkpoint)
    def load_checkpoint_checked(self, *args, **kwargs):
        with _refusing_retired_checkpoints():
            return load_checkpoint(self, *args, **kwargs)

    setattr(load_checkpoint_checked, _MARK, True)
    Trainer.load_checkpoint = load_checkpoint_checked


def apply():
    refuse_on_the_command_line()
    refuse_in_criterion_configs()
    refuse_on_resume()
