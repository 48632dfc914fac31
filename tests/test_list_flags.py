"""kd-flags (the installed console script): every flag a kd-plugin task or criterion adds over fairseq's
parent config, with the dataclass default; an unknown name is one line and exit status 2.

Expectations come from the registered dataclasses, never from a list of flag names: the flag sets change."""
import dataclasses
import enum
import os
import re
import subprocess

import pytest

from helpers import BIN

import kd_plugin  # noqa: F401  (registrations)
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

# name -> (its dataclass, the parent's): every kd-plugin task and criterion registered
CONFIGS = dict(
    [(n, (TASK_DATACLASS_REGISTRY[n], TASK_DATACLASS_REGISTRY["translation"]))
     for n, c in TASK_REGISTRY.items() if c.__module__.startswith("kd_plugin.")]
    + [(n, (CRITERION_DATACLASS_REGISTRY[n], CRITERION_DATACLASS_REGISTRY["label_smoothed_cross_entropy"]))
       for n, c in CRITERION_REGISTRY.items() if c.__module__.startswith("kd_plugin.")])
ROW = re.compile(r"^  (--[\w-]+)  +(\S+)(?:  +(.*))?$")  # flag, default, help


def kd_flags(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([os.path.join(BIN, "kd-flags"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def expected(name):
    """{flag: printed default} for the fields of ``name``'s dataclass that its parent's lacks."""
    config, parent = CONFIGS[name]
    inherited = {f.name for f in dataclasses.fields(parent)}
    out = {}
    for f in dataclasses.fields(config):
        if f.name in inherited:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, str) and default.startswith("${"):  # II("common.seed"): fairseq's own flag
            continue
        text = str(default.value if isinstance(default, enum.Enum) else default)
        out["--" + f.name.replace("_", "-")] = repr(text) if not text or " " in text else text
    return out


def parse(text):
    """{section title: {flag: (default, help)}}: sections are separated by a blank line."""
    sections = {}
    for block in text.strip().split("\n\n"):
        title, *rows = block.splitlines()
        parsed = [ROW.match(r) for r in rows if r.lstrip().startswith("--")]
        assert all(parsed), rows
        sections[title.split()[0]] = {m.group(1): (m.group(2), m.group(3) or "") for m in parsed}
    return sections


@pytest.fixture(scope="module")
def listing():
    rc, out, err = kd_flags()
    assert rc == 0, err
    return out


def test_sanity_of_the_expectations():
    assert set(CONFIGS) == {"translation_kd", "token_kd", "sentence_kd", "hybrid_kd"}  # on_policy_kd retired
    assert "--teacher-path" in expected("translation_kd") and "--kd-alpha" in expected("token_kd")
    assert "--label-smoothing" not in expected("token_kd") and "--source-lang" not in expected("translation_kd")


def test_listing_holds_every_own_flag_with_its_default(listing):
    sections = parse(listing)
    assert set(sections) == set(CONFIGS)
    for name, rows in sections.items():
        assert {flag: default for flag, (default, _) in rows.items()} == expected(name), name
    assert sections["token_kd"]["--kd-alpha"][1] == CRITERION_DATACLASS_REGISTRY["token_kd"].__dataclass_fields__[
        "kd_alpha"].metadata["help"]


@pytest.mark.parametrize("name", ["translation_kd", "token_kd", "sentence_kd", "hybrid_kd"])
def test_one_name_prints_its_section(listing, name):
    rc, out, err = kd_flags(name)
    assert rc == 0, err
    assert list(parse(out)) == [name]
    assert out.strip() in listing  # the same section as in the full listing
    rows = parse(out)[name]
    assert {flag: default for flag, (default, _) in rows.items()} == expected(name)
    config = CONFIGS[name][0]
    for flag, (_, help_text) in rows.items():
        want = config.__dataclass_fields__[flag[2:].replace("-", "_")].metadata.get("help") or ""
        assert help_text.startswith(want), (flag, help_text, want)


def test_unknown_name_is_one_line_and_status_2():
    rc, out, err = kd_flags("token-kd")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kd-flags: error: ") and "'token-kd'" in lines[0]
    assert all(n in lines[0] for n in CONFIGS), lines[0]
