r"""On-policy prefixes: the student's own outputs replace the gold prefixes of a share of the training batch.

Which sentences: sentence i of update n is on-policy when u(seed, n, id_i) < lambda, u a uniform draw from
numpy's generator seeded with the three integers. The choice depends on the sentence and the update only, so
it is the same however batches are split across workers or --update-freq micro-batches.

What the student outputs: it decodes the chosen sources without gradient, in eval mode (no dropout), through
the unwrapped model (never the DDP wrapper: generation is not a training pass), with fairseq's own
SequenceGenerator at beam 1 and fairseq-generate's length cap min(a * |x| + b, max positions - 1), min
length 1:
    temperature 0   greedy: exactly fairseq-generate --beam 1's output;
    temperature t   sampling (fairseq's Sampling search, logits / t), the RNG seeded by (seed, n, the batch's
                    ids) and the caller's RNG state restored afterwards (dropout is unaffected).
Those rows' target becomes the student's output (ending in EOS), their prev_output_tokens that output behind
EOS; the other rows keep the gold, collated exactly as fairseq collates it.
"""
import contextlib

import numpy as np
import torch
from fairseq import search, utils
from fairseq.data import data_utils
from fairseq.sequence_generator import SequenceGenerator

from kd_plugin.needs import ON_POLICY



def choose_rows(ids, share, seed, update):
    """B bool tensor: the sentences ``ids`` (B int tensor) that take the student's prefix at ``update``."""
    if share <= 0:
        return torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    u = [np.random.default_rng([seed, update, int(i)]).random() for i in ids.tolist()]
    return torch.tensor(u, device=ids.device) < share


def unwrap(model):
    """The model inside fairseq's DDP wrappers (ModuleProxyWrapper -> DistributedDataParallel -> model)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def generate(model, tgt_dict, src_tokens, src_lengths, temperature, max_len_a, max_len_b, seed=0):
    """The student's outputs for these sources (list of 1-D token tensors, each ending in EOS), decoded
    without gradient in eval mode; greedy at temperature 0, else sampled with ``seed``."""
    model = unwrap(model)
    was_training = model.training  # before SequenceGenerator, which puts the model in eval mode
    sampling = temperature > 0
    try:
        generator = SequenceGenerator([model], tgt_dict, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b,
                                      min_len=1, temperature=temperature if sampling else 1.0,
                                      search_strategy=search.Sampling(tgt_dict) if sampling else None)
        model.eval()
        with utils.set_torch_seed(seed) if sampling else contextlib.nullcontext():
            out = generator.generate([model], {"net_input": {"src_tokens": src_tokens, "src_lengths": src_lengths}})
    finally:
        model.train(was_training)
    return [hyps[0]["tokens"] for hyps in out]


def batch_seed(seed, update, ids):
    """The sampling seed of a batch: a function of the run's seed, the update and the batch's sentences."""
    return int(np.random.SeedSequence([seed, update] + ids.tolist()).generate_state(1)[0])


def with_student_prefixes(sample, model, tgt_dict, cfg, seed, update, left_pad_target=False):
    """``sample`` with the student's own prefixes in the chosen rows (a shallow copy; ``sample`` itself is
    unchanged), ``sample[ON_POLICY]`` marking them. ``cfg`` is the criterion's OnPolicy need."""
    rows = choose_rows(sample["id"], cfg.share, seed, update)
    out = dict(sample, **{ON_POLICY: rows})
    if not rows.any():
        return out
    pad, eos = tgt_dict.pad(), tgt_dict.eos()
    net = sample["net_input"]
    hyps = iter(generate(model, tgt_dict, net["src_tokens"][rows], net["src_lengths"][rows], cfg.temperature,
                         cfg.max_len_a, cfg.max_len_b, batch_seed(seed, update, sample["id"])))
    seqs = [next(hyps) if on else utils.strip_pad(t, pad) for on, t in zip(rows.tolist(), sample["target"])]
    out["target"] = data_utils.collate_tokens(seqs, pad, eos, left_pad_target)
    out["net_input"] = dict(net, prev_output_tokens=data_utils.collate_tokens(
        seqs, pad, eos, left_pad_target, move_eos_to_beginning=True))
    out["ntokens"] = int(out["target"].ne(pad).sum())
    return out
