r"""kd-gate-dump: the per-sentence gate g(x) of a hybrid_kd student over a split, as TSV and a plot.

    kd-gate-dump --data DATA --path student.pt --split valid --out gate.tsv [--plot gate.png]
                 [--teacher-path teacher.pt] [--overwrite]

TSV columns: id, gate, src_len, tgt_len, and with --teacher-path the complexity measures
teacher_entropy (mean per-token entropy of the teacher on the gold prefix, nats), disagreement
(mean per-token KL(teacher || student), nats) and student_nll (mean per-token gold NLL of the student).
Prints the Spearman correlation of the gate with each column: the Pearson correlation of the ranks,
tied values sharing the mean of the ranks they span (:func:`spearman`; lengths tie often).

Like the other console scripts (kd_plugin.cli.outputs): existing outputs are refused unless --overwrite
(checked before any work), the TSV and the PNG are written under temporary names and renamed into place,
and bad input (missing data dir or checkpoint, unknown or empty split, a checkpoint without a learned
gate) exits with status 2 and one line.
"""
import argparse
import contextlib
import csv
import os

import numpy as np
import torch
import torch.nn.functional as F

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import fairseq_io, flags, outputs

PROG = "kd-gate-dump"


def get_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    g = flags.add_data_args(p)
    g.set_defaults(split="valid")
    g.add_argument("--path", required=True, help="hybrid_kd student checkpoint (with a learned gate)")
    g.add_argument("--teacher-path", help="teacher checkpoint(s): adds entropy/disagreement columns")
    g.add_argument("--max-tokens", type=flags.positive_int, default=4000)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output TSV")
    o.add_argument("--plot", help="output PNG: gate histogram and gate vs. source length")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _load(args):
    """(task with the split loaded, student, gate, teacher or None); KDConfigError on bad input."""
    import kd_plugin  # noqa: F401  (patches, registrations)
    from kd_plugin.gate import build_gate
    from kd_plugin.retired import check_criterion_cfg
    from kd_plugin.teacher import Teacher, load_members, read_checkpoint

    if not os.path.isfile(args.path):
        raise KDConfigError("--path: checkpoint not found: %s" % args.path)
    cfg = fairseq_io.fairseq_config(args.data, args.source_lang, args.target_lang)
    state = read_checkpoint(args.path, "--path")
    crit_cfg = state["cfg"].criterion
    check_criterion_cfg(crit_cfg, "--path %s" % args.path)
    if not state.get("criterion") or not any(k.startswith("gate.") for k in state["criterion"]):
        raise KDConfigError("--path: %s holds no learned gate (train with --criterion hybrid_kd and "
                            "--kd-gate sentence)" % args.path)
    task = fairseq_io.setup_task(cfg)
    _load_split(task, args.split, args.data)
    [model], _ = load_members(args.path, task, "--path")
    gate = build_gate(crit_cfg.kd_gate, state["cfg"].model.encoder_embed_dim, crit_cfg.kd_gate_hidden)
    gate.load_state_dict({k[len("gate."):]: v for k, v in state["criterion"].items() if k.startswith("gate.")})
    teacher = Teacher.load(args.teacher_path, task) if args.teacher_path else None
    return task, model, gate.eval(), teacher


def _load_split(task, split, data):
    """fairseq_io.load_split, and one clear error for a split of no sentences (whose empty .bin fairseq
    cannot even memory-map)."""
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    pairs = ("%s-%s" % (src, tgt), "%s-%s" % (tgt, src))  # fairseq accepts either order
    first = data.split(":")[0]
    bins = [os.path.join(first, "%s.%s.%s.bin" % (split, pair, lang)) for pair in pairs for lang in (src, tgt)]
    if any(os.path.isfile(b) and os.path.getsize(b) == 0 for b in bins) or len(fairseq_io.load_split(task, split)) == 0:
        raise KDConfigError("--split: the %s split of %s is empty" % (split, data))


def _rows(task, split, model, gate, teacher, max_tokens):
    pad = task.target_dictionary.pad()
    ds = task.dataset(split)
    itr = task.get_batch_iterator(ds, max_tokens=max_tokens).next_epoch_itr(shuffle=False)
    for sample in itr:
        net = sample["net_input"]
        with torch.no_grad():
            enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
            mask = enc["encoder_padding_mask"][0] if enc["encoder_padding_mask"] else None
            g = torch.sigmoid(gate(enc["encoder_out"][0], mask))
            tgt_mask = sample["target"].ne(pad)
            n = tgt_mask.sum(1)
            extra = {}
            if teacher is not None:
                lq = F.log_softmax(model.decoder(net["prev_output_tokens"], encoder_out=enc)[0].float(), -1)
                lp = teacher.signal(net, model)["lprobs"]
                per_tok = {
                    "teacher_entropy": -(lp.exp() * lp).sum(-1),
                    "disagreement": (lp.exp() * (lp - lq)).sum(-1),
                    "student_nll": -lq.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1),
                }
                extra = {k: (v * tgt_mask).sum(1) / n for k, v in per_tok.items()}
        for i, sid in enumerate(sample["id"].tolist()):
            row = {"id": sid, "gate": g[i].item(), "src_len": int(net["src_lengths"][i]), "tgt_len": int(n[i])}
            row.update({k: v[i].item() for k, v in extra.items()})
            yield row


def average_ranks(x):
    """1-based ranks of ``x``; a run of tied values gets the mean of the ranks it spans (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    starts_run = np.r_[True, x[order][1:] != x[order][:-1]]
    first = np.flatnonzero(starts_run)  # 0-based position of each run of ties in sorted order
    last = np.r_[first[1:], len(x)]  # one past its end
    ranks = np.empty(len(x))
    ranks[order] = ((first + 1 + last) / 2.0)[np.cumsum(starts_run) - 1]  # mean of ranks first+1 .. last
    return ranks


def spearman(x, y):
    """Spearman's rho = Pearson correlation of the average ranks of x and y; nan if either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.array([r["gate"] for r in rows])
    lens = np.array([r["src_len"] for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist(g, bins=40, color="tab:blue")
    a.set_xlabel("gate g(x) (1 = token-level, 0 = sentence-level)")
    a.set_ylabel("sentences")
    b.scatter(lens, g, s=4, alpha=0.3)
    edges = np.unique(np.quantile(lens, np.linspace(0, 1, 11)))
    idx = np.clip(np.digitize(lens, edges[1:-1]), 0, len(edges) - 2)
    b.plot([lens[idx == k].mean() for k in range(len(edges) - 1)],
           [g[idx == k].mean() for k in range(len(edges) - 1)], "r-o", label="mean per length decile")
    b.set_xlabel("source length (tokens)")
    b.set_ylabel("gate g(x)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def dump(args):
    tsv = outputs.AtomicOutput(args.out, [""], args.overwrite, "--out")  # refuses existing output before any work
    png = outputs.AtomicOutput(args.plot, [""], args.overwrite, "--plot") if args.plot else contextlib.nullcontext()
    if args.plot and os.path.abspath(args.plot) == os.path.abspath(args.out):
        raise KDConfigError("--plot and --out are the same file %s" % args.out)
    task, model, gate, teacher = _load(args)
    rows = sorted(_rows(task, args.split, model, gate, teacher, args.max_tokens), key=lambda r: r["id"])
    g = np.array([r["gate"] for r in rows])
    print("sentences %d | gate mean %.4f std %.4f min %.4f max %.4f" % (len(g), g.mean(), g.std(), g.min(), g.max()))
    for col in rows[0]:
        if col not in ("id", "gate"):
            print("spearman(gate, %s) = %+.3f" % (col, spearman(g, np.array([r[col] for r in rows]))))
    with tsv, png:  # both renamed into place at the end, or neither
        with open(tsv.tmp_prefix, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
            w.writeheader()
            w.writerows(rows)
        if args.plot:
            plot(rows, png.tmp_prefix)


def cli_main(argv=None):
    flags.run_cli(dump, get_parser().parse_args(argv), PROG)


if __name__ == "__main__":
    cli_main()
