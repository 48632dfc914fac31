"""Input validation shared by the task, the criterions and the command-line tools.

Every check raises :class:`KDConfigError` with one message naming the offending file or flag.
"""
import hashlib
import os

import torch
from fairseq.data import Dictionary


class KDConfigError(ValueError):
    """Bad input to kd-plugin (a file or a flag); the message names it."""


def dictionary_checksum(dictionary):
    """md5 of a fairseq Dictionary's symbol list (order matters: it defines the token ids)."""
    return hashlib.md5("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()


def _teacher_dict_files(ckpt_path, state, lang):
    """Where a teacher's dictionary for ``lang`` may be: beside the checkpoint, then its training data."""
    yield os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "dict.%s.txt" % lang)
    data = getattr(state["cfg"].task, "data", None)
    if data:
        yield os.path.join(data.split(":")[0], "dict.%s.txt" % lang)


def check_dictionaries_match(ckpt_path, state, task):
    """The teacher at ``ckpt_path`` must use the task's source and target dictionaries.

    A teacher whose dictionaries cannot be found is refused: its weights alone cannot tell a vocabulary
    of the same (padded) size with other token ids from the task's.
    """
    data_dir = task.cfg.data.split(":")[0]
    sides = [("source", task.cfg.source_lang, task.source_dictionary, "encoder.embed_tokens.weight"),
             ("target", task.cfg.target_lang, task.target_dictionary, "decoder.embed_tokens.weight")]
    for side, lang, ours, emb_key in sides:
        ours_file = os.path.join(data_dir, "dict.%s.txt" % lang)
        candidates = list(_teacher_dict_files(ckpt_path, state, lang))
        theirs_file = next((f for f in candidates if os.path.isfile(f)), None)
        if theirs_file is None:
            raise KDConfigError(
                "teacher %s: cannot check its %s dictionary, none of %s exists (copy the teacher's "
                "dict.%s.txt beside the checkpoint)" % (ckpt_path, side, ", ".join(candidates), lang))
        if dictionary_checksum(Dictionary.load(theirs_file)) != dictionary_checksum(ours):
            raise KDConfigError(
                "teacher %s uses a different %s dictionary: %s differs from the task's %s"
                % (ckpt_path, side, theirs_file, ours_file))
        emb = state["model"].get(emb_key)
        if emb is not None and emb.size(0) != len(ours):
            raise KDConfigError(
                "teacher %s has a %s vocabulary of %d types, the task's %s has %d"
                % (ckpt_path, side, emb.size(0), ours_file, len(ours)))


def check_finite(x, what):
    """Refuse NaN/inf (teacher logits, cached log-probs): a NaN loss must never propagate silently."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(what)
