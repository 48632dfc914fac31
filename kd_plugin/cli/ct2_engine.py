r"""kd-distill-corpus ``--engine ctranslate2``: the teacher converted once by kd-export's converter, decoded
by CTranslate2 in fairseq's own batches.

The conversion (``kd_plugin.cli.export.convert``, float32 weights unless ``--ct2-quantization``) is cached
in DIR/ct2/{sha256 of the checkpoint, 16 hex}.{quantization}/ and reused by every later run and by the
shards of one run (a file lock makes parallel shards convert once). It is a cache: delete it at will.

Each batch is the one fairseq would decode (``fairseq_io.batch_iterator``: same sentences, same order), so
the output length cap is fairseq-generate's for that batch,

    max_len = min(floor(a * W + b), max_target_positions - 1),   W = the batch's padded source width (EOS incl.)

given to CTranslate2 as ``max_decoding_length`` (fairseq forces EOS after ``max_len`` tokens, CTranslate2
stops there: the same tokens), with ``min_decoding_length=1`` (fairseq's ``min_len``), ``beam_size``,
``num_hypotheses`` (``--nbest``) and ``length_penalty`` (``--lenpen``: hypothesis score / length^lenpen
in both). With float32 weights the greedy output equals fairseq's token for token
(tests/test_distill_ct2.py); beam search is CTranslate2's own, whose finished-hypothesis bookkeeping is
not fairseq's: its agreement with fairseq's beam output is measured, not guaranteed (docs/DISTILL.md).
"""
import fcntl
import logging
import os
import shutil
import tempfile
from types import SimpleNamespace

import numpy as np
from fairseq import utils

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import export, outputs

logger = logging.getLogger("kd_plugin.cli.ct2_engine")

QUANTIZATIONS = tuple(q for q in export.QUANTIZATIONS if q != "none")  # kd-export's, float32 spelled out


def cached_model(teacher_path, teacher_sha256, data, source_lang, target_lang, quantization, out_dir):
    """The CTranslate2 conversion of ``teacher_path`` under ``out_dir``/ct2/, made once (under a lock)."""
    from kd_plugin.teacher import read_checkpoint

    cache = os.path.join(out_dir, "ct2")
    path = os.path.join(cache, "%s.%s" % (teacher_sha256[:16], quantization))
    os.makedirs(cache, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = os.path.join(path, "kd_distill.json")
        if os.path.isfile(info) and outputs.read_json(info).get("teacher_sha256") == teacher_sha256:
            logger.info("CTranslate2 model: %s (cached)", path)
            return path
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
        try:
            args = SimpleNamespace(data=data, path=teacher_path, quantization=quantization)
            export.convert(read_checkpoint(teacher_path, "--path"), args, tmp, os.path.join(tmp, "model"),
                    source_lang, target_lang)
            outputs.write_json(os.path.join(tmp, "model", "kd_distill.json"),
                               {"teacher": os.path.abspath(teacher_path), "teacher_sha256": teacher_sha256,
                                "quantization": quantization})
            if os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(os.path.join(tmp, "model"), path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("CTranslate2 model: %s (converted, %s weights)", path, quantization)
    return path


def load_translator(model_dir, threads, inter_threads):
    import ctranslate2

    return ctranslate2.Translator(model_dir, device="cpu", intra_threads=threads, inter_threads=inter_threads)


class Decoder:
    """Decodes fairseq batches with a CTranslate2 translator; ``__call__(sample)`` -> per sentence, its
    n-best as [(target ids ending with EOS, normalized score)], best first."""

    def __init__(self, translator, src_dict, tgt_dict, gen, max_target_positions):
        self.translator, self.gen = translator, gen
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        self.max_positions = max_target_positions

    def max_len(self, width):
        return min(int(self.gen["max_len_a"] * width + self.gen["max_len_b"]), self.max_positions - 1)

    def __call__(self, sample):
        eos, src_tokens = self.src_dict.eos(), sample["net_input"]["src_tokens"]
        sources = []
        for row in src_tokens:  # the batch's own tokens, padding stripped (either side)
            ids = utils.strip_pad(row, self.src_dict.pad()).tolist()
            sources.append([self.src_dict[t] for t in (ids[:-1] if ids and ids[-1] == eos else ids)])
        cap = self.max_len(src_tokens.size(1))
        results = self.translator.translate_batch(
            sources, beam_size=self.gen["beam"], num_hypotheses=self.gen["nbest"],
            length_penalty=self.gen["lenpen"], max_decoding_length=cap, min_decoding_length=1,
            return_scores=True)
        tgt_eos = self.tgt_dict.eos()
        return [[(np.array([self.tgt_dict.index(t) for t in hyp] + [tgt_eos], dtype=np.int64), float(score))
                 for hyp, score in zip(r.hypotheses, r.scores)] for r in results]


def check_teacher(paths):
    """The CTranslate2 engine decodes one checkpoint; an ensemble stays on the fairseq engine."""
    if len(paths) != 1:
        raise KDConfigError("--engine ctranslate2 decodes one teacher checkpoint; an ensemble (%d checkpoints in "
                            "--path) decodes with --engine fairseq" % len(paths))
