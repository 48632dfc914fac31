"""Modes that lost their measured comparison and left the package (their numbers stay in docs/MIX.md).

Commit e6da8c8 is the last one that has them all. A command line or a checkpoint that asks for one fails with
one line naming it, the commit and why it went.
"""
from kd_plugin.checks import KDConfigError

LAST_COMMIT = "e6da8c8"
_WHY = {
    "scalar": "one learned logit for every sentence; never better than the fixed 1/2 mix",
    "global": "its learning-progress controller ran to its bound; the signal measures loss shape, not benefit",
    "sentence+global": "the learned gate plus the global controller; no better than the learned gate alone",
    "sample": "one prefix per sentence: -1.43 BLEU against the fixed 1/2 mix it approximates",
    "kd_mix": "the one-pass teacher-prefix rules (word, confidence, entropy, hkd, curriculum) stayed at the "
              "single levels' height",
    "kd_gold_weight": "an extra gold term no measured configuration used",
    "kd_gate_warmup": "a warm-up no measured configuration used",
}


def _fail(what, key):
    raise KDConfigError("%s was removed from kd-plugin (last in commit %s, docs/MIX.md \"Retired modes\"): %s"
                        % (what, LAST_COMMIT, _WHY[key]))


RETIRED_FLAGS = {"--kd-mix": "kd_mix", "--kd-mix-start": "kd_mix", "--kd-mix-end": "kd_mix",
                 "--kd-mix-ramp": "kd_mix", "--kd-gate-global-rate": "global", "--kd-gate-global-bound": "global",
                 "--kd-gold-weight": "kd_gold_weight", "--kd-gate-warmup": "kd_gate_warmup"}


def check_argv(argv):
    """Refuse a command line (fairseq-train's) that passes a retired flag, or a retired --kd-gate value."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in RETIRED_FLAGS:
            _fail(flag, RETIRED_FLAGS[flag])
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
