"""kd-plugin: knowledge distillation for fairseq 0.12.2, loaded with ``--user-dir path/to/kd_plugin``.

Registers the task ``translation_kd`` and the criterions ``token_kd``, ``sentence_kd`` and ``hybrid_kd``;
changes fairseq in the ways listed in kd_plugin/fairseq_patches (one ``apply()``).
"""
from kd_plugin import fairseq_patches

fairseq_patches.apply()

from kd_plugin import criterions, tasks  # noqa: E402,F401  (registration side effects)
from kd_plugin.tasks import translation_kd  # noqa: E402,F401
