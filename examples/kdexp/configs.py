"""Every configuration the drivers train: its fairseq-train flags, criterion flags built from the criterion's
registered dataclass.

A configuration (:class:`Config`) names its criterion and a value for every field that defines it
(:func:`defining_fields`: the dataclass's fields less fairseq's own label_smoothed_cross_entropy fields other
than ``label_smoothing``); :func:`criterion_flags` turns them into ``--criterion NAME --field value ...`` in the
order given and raises ConfigError when a field is missing or unknown, so no run depends on a criterion default
and no configuration names a flag that left kd-plugin. The flags are built when a driver asks for them
(``Config.flags()``): parsing a command line does not import fairseq. The values below are those of the recorded
runs (docs/*_results.json): a new setting is a new configuration, not a changed one.

Placeholders, filled by the drivers: {user_dir} (kd_plugin/), {teacher} (the teacher checkpoint: an online
teacher), {distill} (kd-distill-corpus's teacher-decoded targets), {cache} (kd-dump-teacher's top-K cache).
"""
import dataclasses
import shlex

KD_TASK = ["--user-dir", "{user_dir}", "--task", "translation_kd"]
CACHED = ["--teacher-cache", "{cache}"]
ONLINE = ["--teacher-path", "{teacher}"]
TARGETS = ["--teacher-targets", "{distill}"]
CACHE_TOPK = 8  # K of the top-K teacher cache (steps cache8-{train,valid})
LS = {"label_smoothing": 0.1}


class ConfigError(ValueError):
    """A configuration misses a field of its criterion or names one it lacks."""


@dataclasses.dataclass(frozen=True)
class Config:
    """fairseq-train arguments: ``before`` (task, teacher signals), the criterion's flags from ``values``
    ({field: value}, every defining field but those in ``given``), then ``after`` (which gives ``given``'s
    fields, or e.g. an architecture override)."""
    before: tuple
    criterion: str
    values: dict
    after: tuple = ()
    given: tuple = ()

    def flags(self):
        absent = [flag(f) for f in self.given if flag(f) not in self.after]
        if absent:
            raise ConfigError("%s: %s given to no flag of the configuration" % (self.criterion, " ".join(absent)))
        return list(self.before) + criterion_flags(self.criterion, self.values, self.given) + list(self.after)


def _registry():
    import kd_plugin  # noqa: F401  (registers the criteria)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY

    return CRITERION_DATACLASS_REGISTRY


def defining_fields(criterion):
    """The fields that define a configuration of ``criterion``, in its dataclass's order: every field less
    label_smoothed_cross_entropy's other than label_smoothing (sentence_avg, report_accuracy,
    ignore_prefix_size: fairseq's, never set by the drivers)."""
    registry = _registry()
    if criterion not in registry:
        raise ConfigError("unknown criterion %r (one of %s)" % (criterion, ", ".join(sorted(registry))))
    fairseq_own = {f.name for f in dataclasses.fields(registry["label_smoothed_cross_entropy"])} - {"label_smoothing"}
    return [f.name for f in dataclasses.fields(registry[criterion]) if f.name not in fairseq_own]


def flag(field):
    return "--" + field.replace("_", "-")


def criterion_flags(criterion, values, given=()):
    """``["--criterion", criterion, "--field", "value", ...]`` for ``values`` ({field: value}, in that order);
    ``given``: fields the caller's command gives elsewhere. ConfigError if a defining field is neither in
    ``values`` nor ``given``, or if ``values`` names a field ``criterion`` lacks."""
    fields = defining_fields(criterion)
    missing = [flag(f) for f in fields if f not in values and f not in given]
    unknown = [flag(f) for f in values if f not in fields]
    if missing or unknown:
        raise ConfigError("%s:%s%s" % (criterion, " missing %s" % " ".join(missing) if missing else "",
                                       " unknown %s" % " ".join(unknown) if unknown else ""))
    return ["--criterion", criterion] + [x for f, v in values.items() for x in (flag(f), str(v))]


def missing_flags(args):
    """The defining flags of the criterion named in the argument list ``args`` that it does not give (one
    entry naming --criterion when it names none or an unknown one)."""
    criterion = args[args.index("--criterion") + 1] if "--criterion" in args[:-1] else None
    if criterion not in _registry():
        return ["--criterion (one of %s)" % ", ".join(sorted(_registry()))]
    return [flag(f) for f in defining_fields(criterion) if flag(f) not in args]


# ------------------------------------------------------------------ the criteria's values


def token(topk):
    """token_kd's values (hybrid_kd's token half): forward KL at T = 1, alpha 1/2, on every token."""
    return {"kd_alpha": 0.5, "kd_temperature": 1, "kd_divergence": "forward_kl", "kd_js_beta": 0.5,
            "kd_skew_lambda": 0.1, "kd_topk": topk, "kd_select": "all", "kd_select_rate": 0.5,
            "kd_select_queue": 30000}


def gate(weight):
    """hybrid_kd's gate: ``fixed:<w>`` or ``sentence`` (the learned gate's settings are given either way)."""
    return {"kd_gate": weight, "kd_gate_tau": 1, "kd_gate_weight": 1, "kd_gate_momentum": 0.99, "kd_gate_hidden": 64}


def plain(before=()):
    return Config(tuple(before), "label_smoothed_cross_entropy", LS)


def sentence_kd(before):
    return Config(tuple(before), "sentence_kd", dict(kd_gold_mix=0, **LS))


def token_kd(before, topk):
    return Config(tuple(before), "token_kd", dict(token(topk), **LS))


def hybrid_kd(before, topk, weight, after=()):
    return Config(tuple(before), "hybrid_kd", dict(token(topk), **gate(weight), **LS), tuple(after))


# ------------------------------------------------------------------ examples/demo.py's students

STUDENTS = {
    "plain": plain(),
    "token": token_kd(KD_TASK + CACHED, CACHE_TOPK),
    "sentence": sentence_kd(KD_TASK + TARGETS),
    "hybrid": hybrid_kd(KD_TASK + CACHED + TARGETS, CACHE_TOPK, "fixed:0.5"),
    # opt-in (--students ...): the full-vocabulary signals from the teacher run online (slower)
    "token-online": token_kd(KD_TASK + ONLINE, 0),
    "hybrid-online": hybrid_kd(KD_TASK + ONLINE + TARGETS, 0, "fixed:0.5"),
}
DEFAULT_STUDENTS = ("plain", "token", "sentence", "hybrid")
TEACHER = plain()

# ------------------------------------------------------------------ examples/compare_mix.py's configurations

MIX = {
    "plain": plain(),
    "token-full": token_kd(KD_TASK + ONLINE, 0),
    "token-cache8": token_kd(KD_TASK + CACHED, CACHE_TOPK),
    "sentence": sentence_kd(KD_TASK + TARGETS),
    # online teacher (full vocabulary): the learned per-sentence gate (hybrid_kd's default when its runs were
    # recorded) and the fixed even mix
    "hybrid-gate": hybrid_kd(KD_TASK + ONLINE + TARGETS, 0, "sentence"),
    "hybrid-even": hybrid_kd(KD_TASK + ONLINE + TARGETS, 0, "fixed:0.5"),
}
# hybrid_kd's two-prefix mix with token-level signals from the cache: fixed weights and the learned gate
for _name, _gate in (("even", "fixed:0.5"), ("w25", "fixed:0.25"), ("w75", "fixed:0.75"), ("gate", "sentence")):
    MIX["hybrid-%s-cache8" % _name] = hybrid_kd(KD_TASK + CACHED + TARGETS, CACHE_TOPK, _gate)
# Deep encoder, shallow decoder (Kasai et al. 2021) at the demo student's parameter count: 2 + 1 layers with
# ffn 128 (117,184 non-embedding parameters) instead of 1 + 1 with ffn 256 (116,736); later flags win
DEEP_SHALLOW = ("--encoder-layers", "2", "--decoder-layers", "1", "--encoder-ffn-embed-dim", "128",
                "--decoder-ffn-embed-dim", "128")
MIX["hybrid-even-cache8-ds"] = hybrid_kd(KD_TASK + CACHED + TARGETS, CACHE_TOPK, "fixed:0.5", DEEP_SHALLOW)
# Configurations of docs/mix_results.json whose modes left kd-plugin (kd_plugin/retired.py): compare_mix's
# --report still shows their records, with the flags each record stored; they cannot be trained again.
RETIRED = {"hybrid-global-cache8": "--kd-gate global", "hybrid-sample-cache8": "--kd-gate sample:0.5",
           **{"mix-" + r: "--kd-mix " + r for r in ("word", "confidence", "entropy", "hkd", "curriculum")}}

# ------------------------------------------------------------------ examples/study.py's methods

METHODS = ("plain", "token", "sentence", "hybrid")
LS_FLAGS = (flag("label_smoothing"), str(LS["label_smoothing"]))
# the hybrid method unless study --hybrid: hybrid_kd from the cache with the token method's settings, g(x) fixed
# at 1/2 (the criterion's then-default mix the study's records ran); the order of the records' commands: the
# criterion's flags, its teacher signals, then --label-smoothing (every method's)
HYBRID = Config(tuple(KD_TASK), "hybrid_kd", dict(token(CACHE_TOPK), **gate("fixed:0.5")),
                tuple(CACHED + TARGETS) + LS_FLAGS, given=tuple(LS))


def method_flags(hybrid=None):
    """fairseq-train arguments of each study method (placeholders {user_dir}, {cache}, {distill}); ``hybrid``:
    study --hybrid's text (the hybrid method's flags less the task and --label-smoothing; check it with
    missing_flags), default HYBRID."""
    out = {"plain": MIX["plain"].flags(), "token": MIX["token-cache8"].flags(), "sentence": MIX["sentence"].flags()}
    out["hybrid"] = HYBRID.flags() if hybrid is None else KD_TASK + shlex.split(hybrid) + list(LS_FLAGS)
    return out

# ------------------------------------------------------------------ benchmarks/bench_kd.py's configurations
# (label, configuration); placeholders {cache} (one directory: the top-K cache and the teacher-decoded targets)
# and {topk} (its K) besides {user_dir} and {teacher}

BENCH_TARGETS = ["--teacher-targets", "{cache}"]
BENCH = {
    "plain": ("plain label_smoothed_cross_entropy", plain(["--task", "translation"])),
    "token-online-full": ("token_kd, online teacher, full vocab", token_kd(KD_TASK + ONLINE, "0")),
    "token-online-topk": ("token_kd, online teacher, top-K", token_kd(KD_TASK + ONLINE, "{topk}")),
    "token-cache": ("token_kd, cached top-K", token_kd(KD_TASK + CACHED, "{topk}")),
    "sentence": ("sentence_kd", sentence_kd(KD_TASK + BENCH_TARGETS)),
    "hybrid-online-full": ("hybrid_kd, online teacher, full vocab",
                           hybrid_kd(KD_TASK + ONLINE + BENCH_TARGETS, "0", "fixed:0.5")),
    "hybrid-cache": ("hybrid_kd, cached top-K + targets", hybrid_kd(KD_TASK + CACHED, "{topk}", "fixed:0.5")),
}
# bench_kd's loss probes: (label, token_kd's values, kd_topk None = --topk) or None for fairseq's label-smoothed
# CE alone
PROBE_TOKEN_KD = dict(token(0), **LS)
PROBES = {
    "ls-ce": ("label_smoothed_cross_entropy (fairseq)", None),
    "token-full": ("token_kd, forward_kl, full vocab", PROBE_TOKEN_KD),
    "token-topk": ("token_kd, forward_kl, top-K", dict(PROBE_TOKEN_KD, kd_topk=None)),
    "token-js-full": ("token_kd, js, full vocab (generic path)", dict(PROBE_TOKEN_KD, kd_divergence="js")),
}
