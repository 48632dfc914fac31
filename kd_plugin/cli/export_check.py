r"""kd-export's check: greedy output of the CTranslate2 export against fairseq's own, on validation sentences.

Both sides decode the same sentences one at a time (so fairseq's length cap, which depends on the padded
batch width, is the sentence's own): beam 1, at least one token before EOS (fairseq's ``min_len=1``), and
at most

    max_len(x) = min(floor(a |x| + b), max_target_positions - 1)      (fairseq-generate's rule)

tokens, where ``|x|`` counts the source tokens including its EOS and (a, b) are ``--max-len-a/--max-len-b``
(fairseq's defaults 0 and 200). fairseq forces EOS at step ``max_len``; CTranslate2 stops after
``max_decoding_length = max_len`` steps: both give the same tokens.

The rule (:func:`check_passes`): with float32 weights (``--quantization none|float32``) every sentence
must be identical, token for token; otherwise (float16 / int8 weights) at least ``min_agreement`` percent
of the sentences must be identical.
"""
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


def agreement(ours, theirs):
    """Percentage of sentences whose token sequences are identical (100.0 for no sentences)."""
    if not ours:
        return 100.0
    return 100.0 * sum(a == b for a, b in zip(ours, theirs)) / len(ours)


def check_passes(quantization, percent, min_agreement):
    """The check rule (module docstring): exact for float32 weights, ``min_agreement`` % otherwise."""
    return percent == 100.0 if quantization in EXACT_QUANTIZATIONS else percent >= min_agreement


def first_difference(ours, theirs):
    """A short description of the first sentence where the two outputs differ (for the log), or None."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return "sentence %d: ctranslate2 %r, fairseq %r" % (i, " ".join(a), " ".join(b))
    return None
