from kd_plugin.criterions import hybrid_kd, sentence_kd, token_kd  # noqa: F401
