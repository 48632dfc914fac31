"""Old home of the one-line errors in fairseq's commands (now kd_plugin/fairseq_patches/cli_errors.py); kept
only while kd_plugin/cli/flags.py imports ``exit_with`` from here."""
from kd_plugin.fairseq_patches.cli_errors import exit_with  # noqa: F401
