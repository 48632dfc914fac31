"""One-line errors inside fairseq 0.12.2's own command lines (fairseq-train, fairseq-generate, ...).

Bad input to the plugin raises :class:`kd_plugin.checks.KDConfigError`. Loaded through ``--user-dir`` (during
argument parsing, before the command's ``main`` runs), the plugin wraps the ``main`` of each ``fairseq_cli``
module already imported, so such an error prints ``fairseq-train: error: <message>`` and exits with status 2,
as argparse does for a bad flag, instead of a traceback. Other exceptions pass as they are.
"""
import functools
import os
import sys

from kd_plugin.checks import KDConfigError

_MARK = "_kd_one_line_errors"


def exit_with(prog, error):
    """Print ``prog: error: message`` on stderr and exit with status 2."""
    print("%s: error: %s" % (prog, error), file=sys.stderr)
    sys.exit(2)


def exit_in_one_line(error):
    """:func:`exit_with` under this process's program name (``fairseq-train``...)."""
    exit_with(os.path.basename(sys.argv[0]), error)


def one_line_errors(main):
    """``main`` with KDConfigError turned into :func:`exit_in_one_line`."""
    if getattr(main, _MARK, False):
        return main

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KDConfigError as e:
            exit_in_one_line(e)

    setattr(wrapped, _MARK, True)
    return wrapped


def fairseq_commands():
    """The imported ``fairseq_cli.*`` modules that have a ``main``: non-empty inside a fairseq command."""
    return [m for name, m in list(sys.modules.items())
            if name.startswith("fairseq_cli.") and callable(getattr(m, "main", None))]


def apply():
    """Wrap ``main`` of every imported ``fairseq_cli.*`` module (idempotent)."""
    for module in fairseq_commands():
        module.main = one_line_errors(module.main)
