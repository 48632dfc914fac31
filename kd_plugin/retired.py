"""Modes that left the package: what each was, what was measured and why it went are in docs/MIX.md "Retired
modes" (the hybrid's and the one-pass mixes, last in commit e6da8c8) and docs/ON_POLICY.md (the criterion
``on_policy_kd``, last in commit fd0b6af).

Most lost or tied a measured comparison; ``--kd-gate sentence+global`` and ``--kd-gate scalar`` were removed
without one, and ``--kd-gold-weight`` and ``--kd-gate-warmup`` were never used by a measured configuration: each
message says which. A command line or a checkpoint that asks for one fails with one line naming it, the commit
that last had it and why it went (kd_plugin.fairseq_patches.retired_modes for fairseq's commands, kd-gate-dump
and kd-dump-teacher for their own). A checkpoint trained with ``on_policy_kd`` is a stock model (the criterion
kept no state): it still decodes and resumes under another criterion.
"""
from kd_plugin.checks import KDConfigError

LAST_COMMIT = "e6da8c8"  # the last commit with the retired --kd-gate values, --kd-mix rules and extra terms
ON_POLICY_COMMIT = "fd0b6af"  # the last commit with --criterion on_policy_kd
_WHERE = {"on_policy_kd": (ON_POLICY_COMMIT, "docs/ON_POLICY.md")}  # others: (LAST_COMMIT, docs/MIX.md)
_WHY = {
    "scalar": "one learned logit for every sentence, removed without a measured run: its target is relative "
              "like the sentence gate's, so it could not learn a global preference either (docs/GATE.md)",
    "global": "its learning-progress controller ran to its bound and became fixed:0.88 (17.81 BLEU vs fixed:0.5's "
              "17.82, 1 seed); the signal measures loss shape, not benefit",
    "sentence+global": "the learned gate plus the global controller, removed without a measured run: it was built "
                       "on --kd-gate global, which ran to its bound",
    "sample": "one prefix per sentence: -1.43 BLEU against the fixed 1/2 mix it approximates (3 seeds)",
    "kd_mix": "the one-pass teacher-prefix rules (word, confidence, entropy, hkd, curriculum) stayed at the "
              "single levels' height (16.19-17.02 BLEU vs sentence_kd's 16.42, 1 seed)",
    "kd_gold_weight": "an extra gold term no measured configuration used",
    "kd_gate_warmup": "a warm-up no measured configuration used",
    "targets": "it cached the teacher on its own decoded targets for the --kd-mix rules, retired with them: dump "
               "the gold targets only (kd-dump-teacher without it) and give fairseq-train the decoded corpus with "
               "--teacher-targets",
    "on_policy_kd": "token-level KD on the student's own outputs for a share of the sentences: as a fine-tuning "
                    "stage from token_kd's best checkpoint at the plateau it lost to continuing token_kd, at "
                    "share 1 and 1/2, under every decoding (3 seeds, docs/PLATEAU.md (c)); train with token_kd",
}


def _fail(what, key):
    commit, doc = _WHERE.get(key, (LAST_COMMIT, 'docs/MIX.md "Retired modes"'))
    raise KDConfigError("%s was removed from kd-plugin (last in commit %s, %s): %s" % (what, commit, doc, _WHY[key]))


# retired flags of fairseq-train's command line (the criteria's)
RETIRED_FLAGS = {"--kd-mix": "kd_mix", "--kd-mix-start": "kd_mix", "--kd-mix-end": "kd_mix",
                 "--kd-mix-ramp": "kd_mix", "--kd-gate-global-rate": "global", "--kd-gate-global-bound": "global",
                 "--kd-gold-weight": "kd_gold_weight", "--kd-gate-warmup": "kd_gate_warmup",
                 "--on-policy-share": "on_policy_kd", "--on-policy-temperature": "on_policy_kd",
                 "--on-policy-max-len-a": "on_policy_kd", "--on-policy-max-len-b": "on_policy_kd"}
RETIRED_CRITERIA = {"on_policy_kd": "on_policy_kd"}  # --criterion values
# retired flags of kd-dump-teacher and of its merge step
DUMP_TEACHER_FLAGS = {"--targets": "targets", "--on-targets": "targets"}


def check_flags(argv, retired_flags):
    """Refuse a command line that passes one of ``retired_flags`` (flag -> why it went)."""
    for arg in argv:
        flag = arg.partition("=")[0]
        if flag in retired_flags:
            _fail(flag, retired_flags[flag])


def flag_values(argv, name):
    """The values ``argv`` gives the flag ``name`` (``--name v`` or ``--name=v``)."""
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag == name:
            yield value if eq else (argv[i + 1] if i + 1 < len(argv) else "")


def check_argv(argv):
    """Refuse a command line (fairseq-train's) that passes a retired --criterion, a retired flag or a retired
    --kd-gate value."""
    for value in flag_values(argv, "--criterion"):
        if value in RETIRED_CRITERIA:
            _fail("--criterion %s" % value, RETIRED_CRITERIA[value])
    check_flags(argv, RETIRED_FLAGS)
    for value in flag_values(argv, "--kd-gate"):
        check_gate(value)


def check_gate(spec):
    """Refuse a retired ``--kd-gate`` value."""
    key = "sample" if str(spec).startswith("sample:") else str(spec)
    if key in ("scalar", "global", "sentence+global", "sample"):
        _fail("--kd-gate %s" % spec, key)


def check_criterion_cfg(cfg, where=None):
    """Refuse a criterion configuration that uses a retired mode; ``where`` (e.g. the checkpoint that saved it)
    prefixes the message."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    try:
        mix = get("kd_mix", None)
        if mix not in (None, "gate"):
            _fail("--kd-mix %s" % mix, "kd_mix")
        for key in ("kd_gold_weight", "kd_gate_warmup"):
            if get(key, 0):
                _fail("--%s %s" % (key.replace("_", "-"), get(key)), key)
        if get("kd_gate", None) is not None:
            check_gate(get("kd_gate"))
    except KDConfigError as e:
        if where is None:
            raise
        raise KDConfigError("%s: %s" % (where, e)) from None
