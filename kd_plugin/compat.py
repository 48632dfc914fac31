"""Old home of the fairseq fixes (now kd_plugin/fairseq_patches) and of ``is_weight_copy`` (now
kd_plugin/model_size.py); kept only while tests/test_demo_speed.py imports it from here."""
from kd_plugin.model_size import is_weight_copy  # noqa: F401
