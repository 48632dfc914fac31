"""The task-criterion contract (kd_plugin.needs): each criterion declares its TeacherNeeds, the task reads them
once and serves exactly those keys, batched by the lengths the loss runs on; stock criteria get nothing."""
import numpy as np
import pytest

from inproc import build, first_batch
from kd_plugin.checks import KDConfigError
from kd_plugin.needs import TaskFacts, TeacherNeeds
from test_teacher_cache import cache  # noqa: F401  (module fixture: a top-K cache of train and valid)

CASES = {  # criterion flags -> (declared needs, keys in a batch)
    "token_kd": (["--criterion", "token_kd", "--kd-topk", "8"], TeacherNeeds(logits=True, topk=8),
                 {"teacher"}),
    "sentence_kd": (["--criterion", "sentence_kd", "--kd-gold-mix", "0"],
                    TeacherNeeds(targets=True, gold_targets=False), {"teacher_target", "teacher_net_input"}),
    "sentence_kd+gold": (["--criterion", "sentence_kd", "--kd-gold-mix", "0.5"],
                         TeacherNeeds(targets=True, gold_targets=True), {"teacher_target", "teacher_net_input"}),
    "hybrid_kd": (["--criterion", "hybrid_kd", "--kd-topk", "8", "--kd-gate", "fixed:0.5"],
                  TeacherNeeds(logits=True, targets=True, topk=8), {"teacher", "teacher_target", "teacher_net_input"}),
    "stock": (["--criterion", "label_smoothed_cross_entropy"], TeacherNeeds(), set()),
}
SIGNALS = {"teacher", "teacher_target", "teacher_net_input"}


@pytest.mark.parametrize("name", list(CASES))
def test_task_serves_exactly_what_the_criterion_declares(data_bin, teacher_targets, cache, name):  # noqa: F811
    flags, needs, keys = CASES[name]
    _, task, _, criterion = build(data_bin, "--task", "translation_kd", "--teacher-cache", cache,
                                  "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", *flags)
    assert getattr(criterion, "teacher_needs", TeacherNeeds()) == needs and task.needs.needs == needs
    assert task.teacher is None  # the cache serves the logits: no teacher loaded
    sample = first_batch(task)
    assert SIGNALS & set(sample) == keys
    # batching counts the lengths the loss runs on: gold unless never trained on, teacher output if used
    ds = task.dataset("valid")
    gold, decoded = ds.dataset.tgt_sizes, ds.extras[0].sizes
    lengths = ([gold] if needs.gold_targets else []) + ([decoded] if needs.targets else [])
    want = lengths[0] if len(lengths) == 1 else np.maximum(*lengths)
    assert (ds.target_sizes == want).all()
    assert (gold != decoded).any() and (np.maximum(gold, decoded) != gold).any()  # the cases really differ


def test_criterion_reads_the_task_through_its_facts(data_bin, teacher_targets, cache):  # noqa: F811
    """The other direction: what hybrid_kd's learned gate and padding check read from the task is its TaskFacts
    (the student's encoder dimension, TINY_ARCH's 32; right-padded targets), taken once at construction."""
    flags = ("--task", "translation_kd", "--teacher-cache", cache, "--teacher-targets", teacher_targets,
             "--label-smoothing", "0.1", "--criterion", "hybrid_kd", "--kd-gate", "sentence")
    _, task, model, criterion = build(data_bin, *flags)
    assert task.kd_task_facts() == criterion.facts == TaskFacts(student_dim=32, left_pad_target=False)
    assert criterion.gate.norm.normalized_shape == (model.encoder.embed_tokens.embedding_dim,)  # the gate's width
    with pytest.raises(KDConfigError, match="hybrid_kd needs right-padded targets"):
        build(data_bin, *flags, "--left-pad-target")
