r"""kd-export: a fairseq translation checkpoint as a CTranslate2 model directory, checked against fairseq.

    kd-export --path student.pt --data DATA_BIN --out DIR [--quantization int8|int8_float16|float16|none|...]
              [--spm spm.model] [--check 20] [--min-agreement 70] [--overwrite]

DIR holds the CTranslate2 model (model.bin, config.json, vocabularies), the sentencepiece model as
``spm.model`` when one is found (``--spm``, else DATA/spm.model or DATA/../bpe/spm.model, where
examples/demo.py keeps it, else the checkpoint's ``--sentencepiece-model``), README.txt (how to translate
with ``ctranslate2.Translator``) and kd_export.json (source checkpoint, quantization, check result).

Any checkpoint of a fairseq transformer trained with this plugin (task ``translation_kd``, any criterion)
or with plain fairseq works, with no ``--user-dir`` or unsafe flag. The conversion runs in this process
through ctranslate2's own ``FairseqConverter``, which rebuilds the model with
``fairseq.tasks.setup_task(cfg.model)``. A KD student's saved config names the task ``translation_kd``.
The converter could build that task (this module imports the plugin, which registers it), but the task
checks the student's *training* inputs at start-up (e.g. ``--teacher-targets`` must list one directory
per data directory: a student trained on ``DATA=a:b`` would refuse the single ``--data`` given here), and
any later start-up check of training inputs would break export. The converter gets instead a weights-only
copy of the checkpoint (in the temporary directory) whose model config names the stock ``translation``
task: the network is the same, and that task needs nothing but the dictionaries in DATA (a config
without a task is mapped the same way; other tasks are left as they are). The checkpoint is unpickled like
fairseq-generate does (kd_plugin.fairseq_patches: ``weights_only=False``): export only checkpoints you trust.

Then (``--check N``, default 20; 0 skips it) the first N sentences of DATA's ``--split`` (default valid)
are decoded greedily by fairseq and by CTranslate2: the float32 conversion must be identical (for a quantized
export a float32 conversion is made in the temporary directory for this), and the quantized export must
take fairseq's token at ``--min-agreement`` percent of fairseq's greedy steps given fairseq's own prefix
(the rule is in kd_plugin.cli.export_check).
Exit status: 0 exported and checked; 1 the check failed (nothing written; ``--check 0`` exports
without it); 2 bad input (one line naming the file or flag; nothing written). An existing DIR is
refused unless ``--overwrite``; the model is written to a temporary directory beside DIR and renamed
into place only after the check passed.
"""
import argparse
import copy
import json
import logging
import os
import shutil
import signal
import sys
import warnings

import torch

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import fairseq_io, flags, outputs

PROG = "kd-export"
QUANTIZATIONS = ("none", "float32", "float16", "bfloat16", "int16", "int8", "int8_float16", "int8_float32")
KD_TASK, STOCK_TASK = "translation_kd", "translation"
DEFAULT_MIN_AGREEMENT = 70.0

logger = logging.getLogger(__name__)


class CheckFailed(RuntimeError):
    """The exported model's greedy output disagrees with fairseq's beyond the rule's tolerance."""


class AtomicDirectory(outputs.AtomicOutput):
    """:class:`outputs.AtomicOutput` for one output directory: built at ``tmp_prefix``, renamed at the end.

    With ``overwrite`` the old directory is first moved into the temporary directory (removed with it).
    """

    def __init__(self, path, overwrite=False, flag="--out"):
        super().__init__(path.rstrip(os.sep) or path, [""], overwrite=overwrite, flag=flag)

    def commit(self):
        self.check()
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            if os.path.lexists(self.prefix):
                os.replace(self.prefix, os.path.join(self.tmp_dir, ".replaced"))
            os.replace(self.tmp_prefix, self.prefix)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="Export a fairseq translation checkpoint to "
                                     "CTranslate2 and check its greedy output against fairseq's.")
    parser.add_argument("--path", required=True, metavar="CKPT", help="fairseq checkpoint (student or any)")
    parser.add_argument("--data", required=True, metavar="DIR", help="binarized data dir with the dictionaries")
    parser.add_argument("-s", "--source-lang", default=None, help="default: the checkpoint's, else inferred")
    parser.add_argument("-t", "--target-lang", default=None, help="default: the checkpoint's, else inferred")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                        help="weight type of the export (default int8; none keeps float32)")
    parser.add_argument("--spm", metavar="MODEL", default=None, help="sentencepiece model to copy "
                        "(default: DATA/spm.model, DATA/../bpe/spm.model or the checkpoint's, if any)")
    g = parser.add_argument_group("check against fairseq (greedy, one sentence at a time)")
    g.add_argument("--check", type=int, default=20, metavar="N", help="sentences to compare (0: no check)")
    g.add_argument("--split", default="valid", help="split whose first N sentences are compared")
    g.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, metavar="PCT",
                   help="%% of fairseq's greedy steps a quantized export must agree with, given fairseq's "
                        "prefix (the float32 conversion must always be identical)")
    g.add_argument("--max-len-a", type=float, default=0.0, help="output length cap a*|x|+b (fairseq's)")
    g.add_argument("--max-len-b", type=int, default=200)
    g.add_argument("--cpu-threads", type=flags.positive_int, default=1, help="threads for both decoders")
    return parser


def find_spm(args, state):
    """The sentencepiece model to ship: --spm (must exist), else the first existing default, else None."""
    if args.spm:
        if not os.path.isfile(args.spm):
            raise KDConfigError("--spm: no such file: %s" % args.spm)
        return args.spm
    data = os.path.abspath(args.data.split(":")[0])
    bpe = state["cfg"].get("bpe") or {}
    candidates = [os.path.join(data, "spm.model"), os.path.join(os.path.dirname(data), "bpe", "spm.model"),
                  bpe.get("sentencepiece_model") if bpe.get("_name") == "sentencepiece" else None]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def converter_checkpoint(state, path):
    """Save at ``path`` what ctranslate2's FairseqConverter reads: the model config (as ``args``, task
    ``translation_kd`` or none mapped to ``translation``, see the module docstring) and the weights."""
    model_args = copy.deepcopy(state["cfg"].model)
    if getattr(model_args, "task", None) in (None, KD_TASK):
        setattr(model_args, "task", STOCK_TASK)
    torch.save({"args": model_args, "cfg": None, "model": state["model"]}, path)


def convert(state, args, tmp_dir, model_dir, source_lang, target_lang, quantization=None):
    """Write the CTranslate2 model of ``state`` to ``model_dir`` with ctranslate2's FairseqConverter, with
    ``quantization``'s weights (default ``args.quantization``; none/float32: float32)."""
    from ctranslate2.converters import FairseqConverter

    ckpt = os.path.join(tmp_dir, "converter_input.pt")
    converter_checkpoint(state, ckpt)
    converter = FairseqConverter(ckpt, os.path.abspath(args.data.split(":")[0]), source_lang=source_lang,
                                 target_lang=target_lang, unsafe_deserialization=True)
    quantization = quantization or args.quantization
    quantization = None if quantization == "none" else quantization
    try:
        converter.convert(model_dir, quantization=quantization, force=True)
    except (ValueError, NotImplementedError) as e:  # ctranslate2's "not supported" checks
        raise KDConfigError("--path: CTranslate2 cannot convert %s: %s" % (args.path, e)) from None
    finally:
        os.remove(ckpt)


def readme_text(meta, spm):
    """README.txt of the export: how to translate with ctranslate2.Translator."""
    tok = ("sp = spm.SentencePieceProcessor(model_file=DIR + '/spm.model')\n"
           "src = sp.encode(['Ein kleiner Test.'], out_type=str)     # sentencepiece pieces\n") if spm else (
        "# no sentencepiece model was found: tokenize as the text given to fairseq-preprocess was\n"
        "src = [['a', 'tokenized', 'sentence']]\n")
    detok = "print(sp.decode(out[0].hypotheses[0]))\n" if spm else "print(' '.join(out[0].hypotheses[0]))\n"
    return ("CTranslate2 model exported by kd-export from %(checkpoint)s\n"
            "(%(source_lang)s -> %(target_lang)s, weights %(quantization)s, ctranslate2 %(ctranslate2)s).\n\n"
            "    pip install ctranslate2==%(ctranslate2)s sentencepiece\n\n" % meta
            + "import ctranslate2%s\n" % (", sentencepiece as spm" if spm else "")
            + "DIR = '.'  # this directory\n"
            + "translator = ctranslate2.Translator(DIR, device='cpu', intra_threads=4)\n" + tok
            + "out = translator.translate_batch(src, beam_size=5, max_decoding_length=200)\n" + detok
            + "\nThe source EOS is added by the model (config.json: add_source_eos); do not add it.\n"
            + ("With int8 weights CTranslate2 also computes in int8 where the CPU allows. On a CPU that is not "
               "Intel's and has no\nVNNI (e.g. AMD EPYC before Zen 4) that arithmetic (oneDNN) saturates: "
               "Translator(DIR, compute_type='float32')\nkeeps this file and decodes closer to fairseq "
               "(kd-plugin docs/EXPORT.md).\n" if meta["quantization"].startswith("int8") else "")
            + "Check at export (kd_export.json): %s\n" % json.dumps(meta.get("check")))


def run_check(args, state, model, task, tmp_dir, model_dir, languages):
    """The check of kd_plugin.cli.export_check on the first ``--check`` sentences: the float32 conversion
    (``model_dir`` itself for a float32 export, else one made in ``tmp_dir``) identical to fairseq's greedy
    output, and a quantized export's step agreement >= --min-agreement. Returns the result for
    kd_export.json; raises CheckFailed."""
    import ctranslate2

    from kd_plugin.cli import export_check as ec

    sentences = ec.check_sentences(task, fairseq_io.load_split(task, args.split), args.check)
    positions = model.max_decoder_positions()
    caps = (args.max_len_a, args.max_len_b)
    load = lambda d: ctranslate2.Translator(d, device="cpu", inter_threads=1,  # noqa: E731
                                            intra_threads=args.cpu_threads)
    theirs = ec.fairseq_greedy(model, task, sentences, *caps)
    exact = args.quantization in ec.EXACT_QUANTIZATIONS
    float32_dir = model_dir if exact else os.path.join(tmp_dir, "float32")
    if not exact:
        convert(state, args, tmp_dir, float32_dir, *languages, quantization="none")
    ours = ec.ctranslate2_greedy(load(float32_dir), sentences, *caps, positions)
    n, same = len(sentences), sum(a == b for a, b in zip(ours, theirs))
    result = {"split": args.split, "sentences": n, "beam": 1, "max_len_a": args.max_len_a,
              "max_len_b": args.max_len_b, "float32_identical_sentences": same}
    print("%s: float32 conversion: greedy output identical to fairseq's on %d/%d %s sentences (all required)"
          % (PROG, same, n, args.split))
    if same != n:
        raise CheckFailed("the float32 conversion decodes differently from fairseq on %d of %d sentences; first "
                          "difference: %s" % (n - same, n, ec.first_difference(ours, theirs)))
    if exact:  # the export is that conversion: every step agrees
        translator = None
        agree = steps = sum(len(r) + (len(r) < ec.max_len(len(x) + 1, *caps, positions))
                            for x, r in zip(sentences, theirs))
        flips = []
    else:
        shutil.rmtree(float32_dir)
        translator = load(model_dir)
        agree, steps, flips = ec.step_agreement(translator, sentences, theirs, *caps, positions)
    percent = ec.step_percent(agree, steps)
    identical = n - len({f[0] for f in flips})
    required = 100.0 if exact else args.min_agreement
    compute_type = translator.compute_type if translator else "float32"
    result.update(compute_type=compute_type, agreement_percent=round(100.0 * identical / n, 2) if n else 100.0,
                  steps=steps, step_agreement_percent=round(percent, 2), required_percent=required)
    if not exact:
        print("%s: %s export (computed as %s): %d/%d greedy steps agree with fairseq's given its prefix (%.1f%%; "
              "required %s%%); identical sentences %d/%d" % (PROG, args.quantization, compute_type, agree, steps,
                                                             percent, required, identical, n))
        note = ec.int8_gemm_note(compute_type)
        if note:
            print("%s: note: %s" % (PROG, note))
    if percent < required:
        raise CheckFailed("%s export: %.1f%% of %d greedy steps agree with fairseq's, %s%% required; first "
                          "difference: %s" % (args.quantization, percent, steps, required,
                                              ec.describe_flip(flips[0], sentences)))
    return result


def export(args):
    import kd_plugin  # noqa: F401  (kd_plugin.fairseq_patches: fairseq checkpoints load on torch >= 2.6)

    try:
        import ctranslate2
    except ImportError:
        raise KDConfigError("ctranslate2 is not installed (pip install 'kd-plugin[export]')") from None
    from kd_plugin.cli.export_check import build_fairseq_model
    from kd_plugin.teacher import read_checkpoint

    if args.check < 0:
        raise KDConfigError("--check must be >= 0, got %d" % args.check)
    if not 0 <= args.min_agreement <= 100:
        raise KDConfigError("--min-agreement must be in [0, 100], got %s" % args.min_agreement)
    out = AtomicDirectory(args.out, overwrite=args.overwrite)
    if not os.path.isfile(args.path):
        raise KDConfigError("--path: checkpoint not found: %s" % args.path)
    state = read_checkpoint(args.path, "--path")
    ckpt_task = state["cfg"].task
    src = args.source_lang or getattr(ckpt_task, "source_lang", None)
    tgt = args.target_lang or getattr(ckpt_task, "target_lang", None)
    with warnings.catch_warnings():  # hydra's deprecation notes while fairseq builds its config
        warnings.simplefilter("ignore", UserWarning)
        task = fairseq_io.setup_task(fairseq_io.fairseq_config(args.data, src, tgt))
    src, tgt = task.cfg.source_lang, task.cfg.target_lang
    spm = find_spm(args, state)
    logger.info("sentencepiece model: %s", spm or "none found (pass --spm MODEL to ship one)")
    torch.set_num_threads(args.cpu_threads)
    model = build_fairseq_model(state, task, args.path)
    if args.check:
        fairseq_io.load_split(task, args.split)  # a missing split is bad input, found before any work
    meta = {"checkpoint": os.path.abspath(args.path), "checkpoint_sha256": fairseq_io.file_sha256(args.path),
            "source_lang": src, "target_lang": tgt, "quantization": args.quantization,
            "ctranslate2": ctranslate2.__version__, "sentencepiece_model": os.path.abspath(spm) if spm else None,
            "check": None}
    with out:
        convert(state, args, out.tmp_dir, out.tmp_prefix, src, tgt)
        if spm:
            shutil.copyfile(spm, os.path.join(out.tmp_prefix, "spm.model"))
        if args.check:
            meta["check"] = run_check(args, state, model, task, out.tmp_dir, out.tmp_prefix, (src, tgt))
        outputs.write_json(os.path.join(out.tmp_prefix, "kd_export.json"), meta)
        with open(os.path.join(out.tmp_prefix, "README.txt"), "w") as f:
            f.write(readme_text(meta, spm))
    size = sum(os.path.getsize(os.path.join(out.prefix, f)) for f in os.listdir(out.prefix))
    print("%s: wrote %s (%s weights, %.2f MB)%s" % (PROG, out.prefix, args.quantization, size / 1e6,
                                                   "" if spm else "; no sentencepiece model found"))


def cli_main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        flags.run_cli(export, args, PROG)
    except CheckFailed as e:
        print("%s: check failed: %s" % (PROG, e), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
