"""One-line errors inside fairseq's own command lines (fairseq-train, fairseq-generate, fairseq-interactive).

Bad input to the plugin raises :class:`kd_plugin.checks.KDConfigError`. Loaded through ``--user-dir``
(during argument parsing, before the command's ``main`` runs), the plugin wraps the ``main`` of each
``fairseq_cli`` module already imported, so such an error prints ``fairseq-train: error: <message>`` and
exits with status 2, as argparse does for a bad flag, instead of a traceback. Other exceptions pass as they are.
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


def one_line_errors(main):
    """``main`` with KDConfigError turned into :func:`exit_with` under this process's program name."""
    if getattr(main, _MARK, False):
        return main

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KDConfigError as e:
            exit_with(os.path.basename(sys.argv[0]), e)

    setattr(wrapped, _MARK, True)
    return wrapped


def patch_fairseq_cli():
    """Wrap ``main`` of every imported ``fairseq_cli.*`` module (idempotent); inside such a command, refuse a
    retired flag on its command line in one line (kd_plugin.retired) instead of argparse's "unrecognized"."""
    from kd_plugin.retired import check_argv

    inside = False
    for name, module in list(sys.modules.items()):
        if name.startswith("fairseq_cli.") and callable(getattr(module, "main", None)):
            module.main = one_line_errors(module.main)
            inside = True
    if inside:
        try:
            check_argv(sys.argv[1:])
        except KDConfigError as e:
            exit_with(os.path.basename(sys.argv[0]), e)
