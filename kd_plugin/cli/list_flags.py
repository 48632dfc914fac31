r"""kd-flags: the command-line flags kd-plugin adds to fairseq-train, with their defaults and help.

    kd-flags              the task translation_kd's flags, then every kd-plugin criterion's
    kd-flags NAME         one of them: translation_kd, token_kd, sentence_kd, hybrid_kd

fairseq 0.12.2's ``fairseq-train --help`` is printed before the task's and the criterion's flags are added,
so it never shows them. This lists, one line per flag (flag, default, help), the flags a task adds over
fairseq's ``translation`` and a criterion over ``label_smoothed_cross_entropy``, generated from the
registered dataclasses by fairseq's own parser builder (so exactly what fairseq-train accepts).
An unknown NAME: one line ``kd-flags: error: ...`` naming the valid ones, exit status 2.
"""
import argparse
import sys

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import flags

PROG = "kd-flags"
TASK_PARENT, CRITERION_PARENT = "translation", "label_smoothed_cross_entropy"


def get_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", metavar="NAME", help="a kd-plugin task or criterion (default: all of them)")
    return p


def registered():
    """{name: (kind, dataclass, parent dataclass)} for kd-plugin's tasks, then its criteria, sorted by name."""
    import kd_plugin  # noqa: F401  (registrations)
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY, CRITERION_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    out = {}
    for kind, classes, dataclasses, parent in (("task", TASK_REGISTRY, TASK_DATACLASS_REGISTRY, TASK_PARENT),
                                               ("criterion", CRITERION_REGISTRY, CRITERION_DATACLASS_REGISTRY,
                                                CRITERION_PARENT)):
        for name in sorted(classes):
            if classes[name].__module__.startswith("kd_plugin.") and name in dataclasses:
                out[name] = (kind, parent, dataclasses[name], dataclasses[parent])
    return out


def own_actions(dataclass, parent):
    """argparse actions of ``dataclass``'s flags that ``parent``'s do not have, in declaration order."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    def actions(dc):
        p = argparse.ArgumentParser(add_help=False)
        gen_parser_from_dataclass(p, dc())
        return [a for a in p._actions if a.option_strings]

    inherited = {a.dest for a in actions(parent)}
    return [a for a in actions(dataclass) if a.dest not in inherited]


def show_default(value):
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


def section(name, kind, parent, actions):
    lines = ["%s (--user-dir kd_plugin --%s %s): flags added to %s's" % (name, kind, name, parent)]
    rows = [(", ".join(a.option_strings), show_default(a.default),
             (a.help or "") + (" {%s}" % ",".join(map(str, a.choices)) if a.choices else "")) for a in actions]
    header = ("FLAG", "DEFAULT", "HELP")
    width = [max(len(r[i]) for r in rows + [header]) for i in range(2)]
    for row in [header] + rows:
        lines.append(("  %-*s  %-*s  %s" % (width[0], row[0], width[1], row[1], row[2])).rstrip())
    return "\n".join(lines)


def list_flags(args):
    found = registered()
    if args.name is not None and args.name not in found:
        raise KDConfigError("unknown name %r; valid names: %s" % (args.name, ", ".join(found)))
    names = [args.name] if args.name else list(found)
    print("\n\n".join(section(n, found[n][0], found[n][1], own_actions(*found[n][2:])) for n in names))


def cli_main(argv=None):
    flags.run_cli(list_flags, get_parser().parse_args(sys.argv[1:] if argv is None else argv), PROG)


if __name__ == "__main__":
    cli_main()
