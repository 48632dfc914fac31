r"""kd-gate-dump: the per-sentence gate g(x) of a hybrid_kd student over a split, as TSV and a plot.

    kd-gate-dump --data DATA --path student.pt --split valid --out gate.tsv [--plot gate.png]
                 [--teacher-path teacher.pt]

TSV columns: id, gate, src_len, tgt_len, and with --teacher-path the complexity measures
teacher_entropy (mean per-token entropy of the teacher on the gold prefix, nats), disagreement
(mean per-token KL(teacher || student), nats) and student_nll (mean per-token gold NLL of the student).
Prints the Spearman correlation of the gate with each column.
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from kd_plugin.checks import KDConfigError


def _load(args):
    import kd_plugin  # noqa: F401  (patches, registrations)
    from fairseq import checkpoint_utils, tasks
    from kd_plugin.gate import build_gate
    from kd_plugin.teacher import Teacher, read_checkpoint

    state = read_checkpoint(args.path, "--path")
    crit_cfg = state["cfg"].criterion
    if not state.get("criterion") or not any(k.startswith("gate.") for k in state["criterion"]):
        raise KDConfigError("--path: %s holds no learned gate (train with --criterion hybrid_kd and "
                            "--kd-gate sentence or scalar)" % args.path)
    task_cfg = state["cfg"].task
    task_cfg.data = args.data
    task = tasks.get_task("translation").setup_task(task_cfg)
    task.load_dataset(args.split)
    [model], _ = checkpoint_utils.load_model_ensemble([args.path], task=task)
    gate = build_gate(crit_cfg.kd_gate, state["cfg"].model.encoder_embed_dim, crit_cfg.kd_gate_hidden)
    gate.load_state_dict({k[len("gate."):]: v for k, v in state["criterion"].items() if k.startswith("gate.")})
    teacher = Teacher.load(args.teacher_path, task) if args.teacher_path else None
    return task, model.eval(), gate.eval(), teacher


def _rows(task, model, gate, teacher, max_tokens):
    pad = task.target_dictionary.pad()
    ds = task.dataset(next(iter(task.datasets)))
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


def spearman(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="kd-gate-dump", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="binarized data directory")
    p.add_argument("--path", required=True, help="hybrid_kd student checkpoint")
    p.add_argument("--split", default="valid")
    p.add_argument("--out", required=True, help="output TSV")
    p.add_argument("--plot", help="output PNG: gate histogram and gate vs. source length")
    p.add_argument("--teacher-path", help="teacher checkpoint(s): adds entropy/disagreement columns")
    p.add_argument("--max-tokens", type=int, default=4000)
    args = p.parse_args(argv)
    task, model, gate, teacher = _load(args)
    rows = sorted(_rows(task, model, gate, teacher, args.max_tokens), key=lambda r: r["id"])
    tmp = args.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, args.out)
    g = np.array([r["gate"] for r in rows])
    print("sentences %d | gate mean %.4f std %.4f min %.4f max %.4f" % (len(g), g.mean(), g.std(), g.min(), g.max()))
    for col in rows[0]:
        if col not in ("id", "gate"):
            print("spearman(gate, %s) = %+.3f" % (col, spearman(g, np.array([r[col] for r in rows]))))
    if args.plot:
        plot(rows, args.plot)


def cli_main():
    try:
        main()
    except KDConfigError as e:
        sys.exit("kd-gate-dump: error: %s" % e)


if __name__ == "__main__":
    cli_main()
