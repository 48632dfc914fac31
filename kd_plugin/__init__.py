"""kd-plugin: knowledge distillation for fairseq 0.12.2, loaded with ``--user-dir path/to/kd_plugin``.

Registers the task ``translation_kd`` and the criterions ``token_kd``, ``sentence_kd``, ``hybrid_kd`` and
``on_policy_kd``.
"""
from kd_plugin import cli_errors, compat

compat.apply()
cli_errors.patch_fairseq_cli()

from kd_plugin import criterions, tasks  # noqa: E402,F401  (registration side effects)
from kd_plugin.criterions import state as _criterion_state  # noqa: E402
from kd_plugin.tasks import translation_kd  # noqa: E402,F401

_criterion_state.patch_trainer()  # parameter-less criterion state across resumes; refuses retired modes
