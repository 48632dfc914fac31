r"""kd-export's check: greedy output of the CTranslate2 export against fairseq's own, on validation sentences.

Both sides decode the same sentences one at a time (so fairseq's length cap, which depends on the padded
batch width, is the sentence's own): beam 1, at least one token before EOS (fairseq's ``min_len=1``), and
at most

    max_len(x) = min(floor(a |x| + b), max_target_positions - 1)      (fairseq-generate's rule)

tokens, where ``|x|`` counts the source tokens including its EOS and (a, b) are ``--max-len-a/--max-len-b``
(fairseq's defaults 0 and 200). fairseq forces EOS at step ``max_len``; CTranslate2 stops after
``max_decoding_length = max_len`` steps: both give the same tokens.

The rule has two parts (docs/EXPORT.md, "The check and its rule"):

1. The conversion: the checkpoint converted with float32 weights (the export itself for
   ``--quantization none|float32``, else a float32 conversion in kd-export's temporary directory) must give
   fairseq's greedy output on every sentence, token for token. This is what kd-export and ctranslate2's
   converter are responsible for (vocabularies, positions, layers, EOS), and it is exact.
2. The quantization (float16 / bfloat16 / int8 / int16 weights): :func:`step_agreement` -- of fairseq's
   greedy decisions (each output token and the final EOS), the share the export takes too when given
   fairseq's own prefix -- must be at least ``min_agreement`` percent. Identical whole sentences are also
   reported, but they are no rule: one flipped near-tie changes the rest of a sentence, so their share falls
   with the output length and, over 20 sentences, moves by tens of points between samples of the same export
   (docs/EXPORT.md: 10-60 % for the demo student's int8 export, whose step agreement stays within 79-95 %).
"""
import os
import re

import torch
from fairseq import models
from fairseq.sequence_generator import SequenceGenerator

from kd_plugin.checks import KDConfigError

EXACT_QUANTIZATIONS = ("none", "float32")


def build_fairseq_model(state, task, path):
    """The checkpoint's model for the stock translation ``task``, in eval mode (float32, CPU).

    The embedding sizes must match the data dir's dictionaries (the same check fairseq's load_state_dict
    would fail on, as one line naming the dictionary).
    """
    for side, dictionary, key in (("source", task.source_dictionary, "encoder.embed_tokens.weight"),
                                  ("target", task.target_dictionary, "decoder.embed_tokens.weight")):
        emb = state["model"].get(key)
        if emb is not None and emb.size(0) != len(dictionary):
            lang = task.cfg.source_lang if side == "source" else task.cfg.target_lang
            raise KDConfigError("--data: %s has a %s vocabulary of %d types, dict.%s.txt in %s has %d"
                                % (path, side, emb.size(0), lang, task.cfg.data, len(dictionary)))
    model = models.build_model(state["cfg"].model, task, from_checkpoint=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return model.float().eval()


def check_sentences(task, dataset, n):
    """The first ``n`` sentences of ``dataset``: (source tokens without EOS, as strings) per sentence."""
    src_dict = task.source_dictionary
    out = []
    for i in range(min(n, len(dataset))):
        ids = dataset[i]["source"].tolist()
        if ids and ids[-1] == src_dict.eos():
            ids = ids[:-1]
        out.append([src_dict[t] for t in ids])
    return out


def max_len(num_source_tokens, max_len_a, max_len_b, max_target_positions):
    """fairseq's output length cap for a source of ``num_source_tokens`` tokens (EOS included)."""
    return min(int(max_len_a * num_source_tokens + max_len_b), max_target_positions - 1)


def fairseq_greedy(model, task, sentences, max_len_a, max_len_b):
    """fairseq's SequenceGenerator, beam 1, one sentence at a time: output tokens (strings, no EOS)."""
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    generator = SequenceGenerator([model], tgt_dict, beam_size=1, max_len_a=max_len_a, max_len_b=max_len_b,
                                  min_len=1)
    out = []
    with torch.inference_mode():
        for tokens in sentences:
            ids = [src_dict.index(t) for t in tokens] + [src_dict.eos()]
            sample = {"net_input": {"src_tokens": torch.tensor([ids]), "src_lengths": torch.tensor([len(ids)])}}
            hypo = generator.generate([model], sample)[0][0]["tokens"].tolist()
            if hypo and hypo[-1] == tgt_dict.eos():
                hypo = hypo[:-1]
            out.append([tgt_dict[t] for t in hypo])
    return out


def ctranslate2_greedy(translator, sentences, max_len_a, max_len_b, max_target_positions):
    """The CTranslate2 model's greedy output under the same rule (one sentence at a time)."""
    out = []
    for tokens in sentences:
        cap = max_len(len(tokens) + 1, max_len_a, max_len_b, max_target_positions)
        result = translator.translate_batch([tokens], beam_size=1, max_decoding_length=cap, min_decoding_length=1)
        out.append(result[0].hypotheses[0])
    return out


def step_percent(agree, steps):
    """Percentage of agreeing steps (100.0 for no steps)."""
    return 100.0 * agree / steps if steps else 100.0


def first_difference(ours, theirs):
    """A short description of the first sentence where the two outputs differ (for the log), or None."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return "sentence %d: ctranslate2 %r, fairseq %r" % (i, " ".join(a), " ".join(b))
    return None


def step_agreement(translator, sentences, reference, max_len_a, max_len_b, max_target_positions):
    """Teacher-forced agreement of the export with fairseq's greedy output ``reference``.

    A step is one decision of fairseq's greedy search: each output token, and the EOS that ended the
    sentence unless fairseq's length cap forced it. The export agrees at a step when, given fairseq's own
    prefix, its greedy choice is fairseq's token. Computed with one CTranslate2 greedy decoding per sentence
    plus one per disagreement: after a disagreement at step j, decoding resumes from fairseq's prefix of
    j + 1 tokens (``target_prefix``). Returns (agreeing steps, steps, [(sentence, step, fairseq token,
    export token)] per disagreement; None stands for EOS).
    """
    agree = total = 0
    flips = []
    for i, (tokens, ref) in enumerate(zip(sentences, reference)):
        cap = max_len(len(tokens) + 1, max_len_a, max_len_b, max_target_positions)
        target = list(ref) + [None] * (len(ref) < cap)  # fairseq's decisions; None: EOS
        total += len(target)
        t = 0
        while t < len(target):
            prefix = {"target_prefix": [list(ref[:t])]} if t else {}
            out = translator.translate_batch([tokens], beam_size=1, max_decoding_length=cap, min_decoding_length=1,
                                             **prefix)[0].hypotheses[0]
            ours = list(out) + [None] * (len(out) < cap)
            j = t
            while j < len(target) and j < len(ours) and ours[j] == target[j]:
                j += 1
            agree += j - t
            if j < len(target):
                flips.append((i, j, target[j], ours[j] if j < len(ours) else None))
            t = j + 1
    return agree, total, flips


def describe_flip(flip, sentences):
    """One disagreement of :func:`step_agreement`, for the log."""
    i, j, theirs, ours = flip
    tok = lambda t: "</s>" if t is None else t  # noqa: E731
    return "sentence %d (%d source tokens), step %d: fairseq %r, export %r" % (
        i, len(sentences[i]), j, tok(theirs), tok(ours))


def int8_gemm_note(compute_type, environ=None, cpuinfo="/proc/cpuinfo"):
    """A warning when CTranslate2 computes int8 with oneDNN's GEMM on a CPU without VNNI, else None.

    CTranslate2 uses Intel MKL only on Intel CPUs (unless ``CT2_USE_MKL=1``); elsewhere its int8 GEMM is
    oneDNN's u8s8 one, which without AVX512-VNNI / AVX-VNNI adds pairs of products in saturating 16-bit
    registers (oneDNN issue #717; pytorch PR #136942 avoids that path for the same reason). Measured in
    docs/EXPORT.md on an AMD EPYC: 7-12 % of the greedy decisions change, against 1-1.4 % for int8 with MKL.
    """
    environ = os.environ if environ is None else environ
    if not compute_type.startswith("int8") or environ.get("CT2_USE_MKL") == "1":
        return None
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    if vendor is None or vendor.group(1) == "GenuineIntel" or flags & {"avx512_vnni", "avx_vnni"}:
        return None
    return ("CTranslate2 computes int8 on this %s CPU (no VNNI) with oneDNN's GEMM, whose 16-bit sums saturate: "
            "load the model with compute_type='float32' (same file) or set CT2_USE_MKL=1 for output closer to "
            "fairseq's (docs/EXPORT.md)" % vendor.group(1))
