"""Modes that left the package (docs/MIX.md "Retired modes": what each was, what was measured, why it went).

Most lost or tied a measured comparison; ``--kd-gate sentence+global`` and ``--kd-gate scalar`` were removed
without one, and ``--kd-gold-weight`` and ``--kd-gate-warmup`` were never used by a measured configuration: each
message says which. Commit e6da8c8 is the last one that has them all. A command line or a checkpoint that asks
for one fails with one line naming it, the commit and why it went (kd_plugin.fairseq_patches.retired_modes for
fairseq's commands, kd-gate-dump and kd-dump-teacher for their own).
"""
from kd_plugin.checks import KDConfigError

LAST_COMMIT = "e6da8c8"
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
}


def _fail(what, key):
    raise KDConfigError("%s was removed from kd-plugin (last in commit %s, docs/MIX.md \"Retired modes\"): %s"
                        % (what, LAST_COMMIT, _WHY[key]))


# retired flags of fairseq-train's command line (the criteria's)
RETIRED_FLAGS = {"--kd-mix": "kd_mix", "--kd-mix-start": "kd_mix", "--kd-mix-end": "kd_mix",
                 "--kd-mix-ramp": "kd_mix", "--kd-gate-global-rate": "global", "--kd-gate-global-bound": "global",
                 "--kd-gold-weight": "kd_gold_weight", "--kd-gate-warmup": "kd_gate_warmup"}
# retired flags of kd-dump-teacher and of its merge step
DUMP_TEACHER_FLAGS = {"--targets": "targets", "--on-targets": "targets"}


def check_flags(argv, retired_flags):
    """Refuse a command line that passes one of ``retired_flags`` (flag -> why it went)."""
    for arg in argv:
        flag = arg.partition("=")[0]
        if flag in retired_flags:
            _fail(flag, retired_flags[flag])


def check_argv(argv):
    """Refuse a command line (fairseq-train's) that passes a retired flag, or a retired --kd-gate value."""
    check_flags(argv, RETIRED_FLAGS)
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag == "--kd-gate":
            check_gate(value or (argv[i + 1] if i + 1 < len(argv) else ""))


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
