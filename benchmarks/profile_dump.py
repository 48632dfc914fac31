#!/usr/bin/env python3
r"""Where kd-dump-teacher's time goes, as ratios to a bare teacher forward on the same batches.

    .venv/bin/python benchmarks/profile_dump.py                 # the demo's teacher and train split
    .venv/bin/python benchmarks/profile_dump.py --data D --path T.pt --split train --sentences 5000

One process, --threads intra-op threads, the batches kd-dump-teacher makes (--max-tokens 4000, its block
batching), collated once before timing. Each stage runs over all batches and adds one step of the dump to
the previous stage, --rounds times interleaved (forward, +log_softmax, +top-K and rest, +fp16/numpy, forward,
...); reported: the median seconds and target tokens/s of each stage and its ratio to the forward. Then
kd-dump-teacher itself runs on the same split and sentences (--cpu-threads --threads) and its logged
tokens/s gives the ratio of the whole tool (loading, batching, writing) to the forward.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "work", "demo")
STAGES = ("forward", "+log_softmax", "+top-K and rest", "+fp16 to numpy")


def batches(args):
    """(teacher model, [(net_input, target mask)]) of the first --sentences sentences of the split."""
    import kd_plugin  # noqa: F401  (compat fixes)
    from kd_plugin.cli import fairseq_io
    from kd_plugin.cli.dump_teacher import teacher_batches

    task = fairseq_io.setup_task(fairseq_io.fairseq_config(args.data))
    dataset = fairseq_io.load_split(task, args.split)
    [model], _ = fairseq_io.load_ensemble(args.path, task)
    n = min(args.sentences or len(dataset), len(dataset))
    args.total, args.block = len(dataset), n if n < len(dataset) else 10000  # a subset = the first block
    opts = argparse.Namespace(block_size=args.block, max_tokens=4000, batch_size=None, seed=1)
    pad = task.target_dictionary.pad()
    out = [(s["net_input"], s["target"].ne(pad)) for s in teacher_batches(task, dataset, [model], (0, n), opts)
           if "net_input" in s]
    return model, out, n


def run_stage(model, data, depth, k):
    """Seconds for stages [0, depth] over every batch."""
    import torch
    import torch.nn.functional as F

    from kd_plugin.data.teacher_cache import to_fp16, topk_and_rest

    start = time.perf_counter()
    with torch.inference_mode():
        for net_input, mask in data:
            x = model(**net_input)[0]
            if depth >= 1:
                x = F.log_softmax(x, dim=-1, dtype=torch.float32)
            if depth >= 2:
                top, ids, rest = topk_and_rest(x[mask], k)
            if depth >= 3:
                to_fp16(top), ids.numpy(), to_fp16(rest)
    return time.perf_counter() - start


def dump_tokens_per_s(args):
    """kd-dump-teacher's (tokens, seconds) from its own log, on the same sentences and blocks (a subset is
    shard 0 of blocks of --sentences sentences)."""
    exe = os.path.join(os.path.dirname(sys.executable), "kd-dump-teacher")
    with tempfile.TemporaryDirectory() as out:
        cmd = [exe, "--data", args.data, "--path", args.path, "--split", args.split, "--topk", str(args.topk),
               "--out", out, "--max-tokens", "4000", "--cpu-threads", str(args.threads),
               "--block-size", str(args.block), "--num-shards", str(-(-args.total // args.block)), "--shard-id", "0"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r": (\d+) tokens in ([\d.]+) s \((\d+) tokens/s\)", log)
    return int(m.group(1)), float(m.group(2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(DEMO, "data-bin"))
    parser.add_argument("--path", default=os.path.join(DEMO, "ckpt", "teacher", "checkpoint_last.pt"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--sentences", type=int, default=0, help="the first N sentences (0: all)")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for flag, path in (("--data", args.data), ("--path", args.path)):
        if not os.path.exists(path):
            parser.error("%s: %s not found (run make demo first, or pass it)" % (flag, path))
    import torch

    torch.set_num_threads(args.threads)
    model, data, n = batches(args)
    tokens = int(sum(mask.sum() for _, mask in data))
    times = {s: [] for s in STAGES}
    for _ in range(args.rounds):
        for depth, stage in enumerate(STAGES):
            times[stage].append(run_stage(model, data, depth, args.topk))
    fwd = statistics.median(times["forward"])
    print("| stage (%d sentences, %d target tokens, %d thread(s), %d rounds) | s | tokens/s | time / forward |"
          % (n, tokens, args.threads, args.rounds))
    print("|---|---:|---:|---:|")
    for stage in STAGES:
        t = statistics.median(times[stage])
        print("| %s | %.1f | %.0f | %.2f |" % (stage, t, tokens / t, t / fwd))
    dumped, seconds = dump_tokens_per_s(args)
    print("| kd-dump-teacher (its own log: %d tokens) | %.1f | %.0f | %.2f |"
          % (dumped, seconds, dumped / seconds, seconds / fwd * tokens / max(dumped, 1)))


if __name__ == "__main__":
    main()
