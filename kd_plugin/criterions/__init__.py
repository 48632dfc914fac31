from kd_plugin.criterions import hybrid_kd, on_policy_kd, sentence_kd, token_kd  # noqa: F401
