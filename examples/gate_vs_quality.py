#!/usr/bin/env python3
"""Does the hybrid gate point at the sentences where token-level KD helps more than sentence-level KD?

    python examples/gate_vs_quality.py --gate gate.tsv --refs test.en --token token.hyp --sentence sentence.hyp

gate.tsv is kd-gate-dump's output for the split (ids = line numbers of the other files). Per sentence:
delta(x) = chrF(token student) - chrF(sentence student) (sacreBLEU sentence chrF). If g(x) (1 = token-level)
tracks which signal helps, delta rises with g. Prints a markdown table of delta per gate quintile and
Spearman(g, delta).
"""
import argparse
import csv
import sys

import numpy as np

from kdexp.pipeline import read_lines as read
from kd_plugin.cli.gate_dump import spearman


def main(argv=None):
    from sacrebleu.metrics import CHRF

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gate", required=True, help="kd-gate-dump TSV")
    p.add_argument("--refs", required=True, help="references, one per line")
    p.add_argument("--token", required=True, help="token_kd student's hypotheses")
    p.add_argument("--sentence", required=True, help="sentence_kd student's hypotheses")
    p.add_argument("--bins", type=int, default=5)
    a = p.parse_args(argv)
    with open(a.gate, newline="") as f:
        gate = {int(r["id"]): float(r["gate"]) for r in csv.DictReader(f, delimiter="\t")}
    refs, tok, sent = read(a.refs), read(a.token), read(a.sentence)
    if not len(refs) == len(tok) == len(sent) == len(gate):
        sys.exit("gate_vs_quality: %d gate rows, %d refs, %d token and %d sentence hypotheses differ"
                 % (len(gate), len(refs), len(tok), len(sent)))
    chrf = CHRF()
    g = np.array([gate[i] for i in range(len(refs))])
    c_tok = np.array([chrf.sentence_score(h, [r]).score for h, r in zip(tok, refs)])
    c_sent = np.array([chrf.sentence_score(h, [r]).score for h, r in zip(sent, refs)])
    delta = c_tok - c_sent
    edges = np.quantile(g, np.linspace(0, 1, a.bins + 1))
    idx = np.clip(np.searchsorted(edges[1:-1], g, side="right"), 0, a.bins - 1)
    print("| gate quintile | gate range | sentences | chrF token | chrF sentence | delta (token - sentence) |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in range(a.bins):
        m = idx == k
        print("| %d | %.3f-%.3f | %d | %.1f | %.1f | %+.2f |" % (k + 1, g[m].min(), g[m].max(), m.sum(),
                                                             c_tok[m].mean(), c_sent[m].mean(), delta[m].mean()))
    print("\nSpearman(g, delta) = %+.3f over %d sentences" % (spearman(g, delta), len(g)))


if __name__ == "__main__":
    main()
