"""kdexp.configs: every configuration the drivers train spells out its criterion's flags (checked against the
criteria's registered dataclasses), and a configuration that leaves a field out or adds one is an error."""
import pytest
from kdexp import configs

from driver_helpers import STUDENTS, check_configs, flag_values, flags_of


def test_every_student_spells_out_its_criterion():
    """The demo's students: every criterion flag explicit, none retired, no two the same; the default four are
    plain label smoothing, token_kd and hybrid_kd (g fixed at 1/2) from the top-8 cache, sentence_kd."""
    students = flags_of(configs.STUDENTS)
    assert len(check_configs(students)) == len(students)
    assert list(configs.DEFAULT_STUDENTS) == list(STUDENTS) and "hybrid-even" not in students
    flags = {s: flag_values(students[s]) for s in students}
    assert flags["hybrid"]["--kd-gate"] == flags["hybrid-online"]["--kd-gate"] == "fixed:0.5"
    assert flags["token"]["--kd-topk"] == flags["hybrid"]["--kd-topk"] == "8"
    assert flags["token-online"]["--kd-topk"] == flags["hybrid-online"]["--kd-topk"] == "0"
    assert flags["sentence"]["--kd-gold-mix"] == "0"
    assert all(f["--label-smoothing"] == "0.1" for f in flags.values())


def test_a_configuration_missing_or_adding_a_criterion_field_fails_loudly():
    """kdexp.configs builds a criterion's flags from its dataclass: a field left out (a criterion default
    relied on) or a field the criterion lacks (a retired flag) is an error naming the flag, not a command."""
    complete = dict(configs.token(8), **configs.LS)
    assert configs.criterion_flags("token_kd", complete)[:4] == ["--criterion", "token_kd", "--kd-alpha", "0.5"]
    missing = {k: v for k, v in complete.items() if k != "kd_temperature"}
    with pytest.raises(configs.ConfigError, match="token_kd: missing --kd-temperature$"):
        configs.criterion_flags("token_kd", missing)
    with pytest.raises(configs.ConfigError, match="token_kd: unknown --kd-mix$"):
        configs.criterion_flags("token_kd", dict(complete, kd_mix="word"))
    with pytest.raises(configs.ConfigError, match="unknown criterion 'word_kd'"):
        configs.criterion_flags("word_kd", complete)
    assert configs.missing_flags(["--criterion", "sentence_kd", "--kd-gold-mix", "0"]) == ["--label-smoothing"]
