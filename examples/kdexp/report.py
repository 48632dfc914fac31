"""The demo's markdown report: one table (per system: params, checkpoint and int8 CTranslate2 sizes, updates,
train time, BLEU and chrF, test-set speed of fairseq-generate and of the CTranslate2 export with the export's
BLEU and chrF) and everything needed to reproduce it (command, machine, data and its cleaning, sizes,
criteria, decoding, how speed was measured, sacreBLEU signatures)."""
import datetime
import os
import platform
import shlex
import sys
import time

from kdexp import corpus as build_corpus
from kdexp.data import SPLITS, full_corpus_dir
from kdexp.pipeline import REPO, read_lines, repo_relative
from kdexp.plateau_gap import plateau_line
from kdexp.speed import BATCH, BEAM


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "%d x %s (%s)" % (os.cpu_count() or 0, model, platform.platform())


def command_line(a):
    env = "QUICK=1 " if a.quick and os.environ.get("QUICK") else ""
    return env + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, REPO)] + sys.argv)


def title(a):
    corpus = "`%s`" % os.path.basename(a.data) if a.data else "LibreOffice help"
    pair = "%s -> %s" % (a.src_lang, a.tgt_lang) if a.data else "German -> English"
    return "# kd-plugin demo: %s, %s%s" % (pair, corpus, " (QUICK smoke run)" if a.quick else "")


def cleaning_line(p):
    """The cleaning counts recorded by build_corpus, or None for a corpus built before they were recorded."""
    record = build_corpus.read_cleaning(full_corpus_dir(p))
    if record is None:
        return None
    return "- Cleaning (examples/build_corpus.py, Moses clean-corpus-n style): %s" % build_corpus.cleaning_summary(
        record["read"], record["kept"], record["dropped"], record["limits"])


def report(p, results, criteria, decode_cmd, threads_per_student, shapes):
    """The markdown results. ``criteria``: {student: its fairseq-train arguments}; ``decode_cmd``: the
    test decoding command of a system called SYSTEM; ``threads_per_student``: OpenMP threads of each;
    ``shapes``: {"teacher"/"student": recipes.shape()}."""
    a = p.args
    teacher_train = p.seconds.get("train-teacher", 0.0)
    rows = ["| system | params | checkpoint (MB) | CT2 int8 (MB) | updates | train time (s) | BLEU | chrF "
            "| fairseq sent/s | CT2 int8 sent/s | CT2 int8 BLEU | CT2 int8 chrF |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        label = "teacher" if name == "teacher" else "student: " + name
        rows.append("| %s | %s | %.2f | %.2f | %d | %.0f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |" % (
            label, "{:,}".format(r["params"]), r["ckpt_mb"], r["ct2_mb"], r["updates"],
            p.seconds.get("train-" + name, 0.0), r["bleu"], r["chrf"], r["fairseq_speed"], r["ct2_speed"],
            r["ct2_bleu"], r["ct2_chrf"]))
    distill = sum(p.seconds.get("distill-" + s, 0.0) for s in ("train", "valid"))
    sizes = {s: len(read_lines(p.path("corpus", "%s.%s" % (s, a.tgt_lang)))) for s in SPLITS}
    first = next(iter(results.values()))
    lines = [
        title(a),
        "",
        "\n".join(rows),
        "",
        "- Command: `%s`" % command_line(a),
        "- Date: %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "- Machine: %s; threads per process: teacher and its test decoding %d, distillation shards 1, students "
        "(training and test decoding) %d, %d students at a time"
        % (machine(), a.threads or _torch_threads(), threads_per_student, a.jobs),
        "- Data: %s; train %d / valid %d / test %d pairs; joint sentencepiece BPE %d"
        % ("`%s` (%s -> %s)" % (a.data, a.src_lang, a.tgt_lang) if a.data
           else "Debian libreoffice-help-de + libreoffice-help-en-us (MPL-2.0)",
           sizes["train"], sizes["valid"], sizes["test"], a.bpe_size),
    ]
    lines += [line for line in [cleaning_line(p)] if line]
    lines += [
        "- Teacher: transformer %s, %s; checkpoint sha256 %s" % (
            arch(shapes["teacher"]), "the plateau teacher of `%s` (--plateau-teacher: trained to convergence by "
            "examples/plateau_teacher.py), not trained by this run" % repo_relative(a.plateau_teacher)
            if a.plateau_teacher else "%s epochs (%.0f s)" % (a.teacher_epochs, teacher_train),
            results["teacher"]["teacher_sha256"]),
        "- Students (all): transformer %s, %s epochs, same seed, lr and --max-tokens (students that train on "
        "teacher-decoded targets batch by those targets' lengths, so their update counts differ)"
        % (arch(shapes["student"]), a.student_epochs),
        "- Shared: adam lr %s, inverse_sqrt warmup %s, max-tokens %s, dropout %s, seed %s%s"
        % (a.lr, a.warmup, a.max_tokens, a.dropout, a.seed, ", max-update %s" % a.max_update if a.max_update else ""),
        "- Student criteria: %s" % "; ".join("%s: `%s`" % (s, " ".join(map(repo_relative, args)))
                                             for s, args in criteria.items()),
        plateau_line(a, results),
    ]
    if distill:
        engine = "CTranslate2 float32" if a.distill_engine == "ctranslate2" else "fairseq"
        lines.append("- Teacher distillation of train+valid (kd-distill-corpus, %s engine, beam %d): %.0f s, "
                     "not included in the sentence/hybrid train times (engines compared: docs/DISTILL.md)"
                     % (engine, a.distill_beam, distill))
    wall = time.time() - p.t0
    reused = "; steps reused from earlier runs (not in this time): %s" % ", ".join(p.reused) if p.reused else ""
    lines += [
        "- Wall time of this run: %.0f s (%.1f min)%s" % (wall, wall / 60, reused),
        "- Decoding: stock `%s` (no --user-dir)" % " ".join(map(repo_relative, decode_cmd)),
        speed_line(p, results),
        "- sacreBLEU: BLEU `%s`, chrF `%s`" % (first["bleu_signature"], first["chrf_signature"]),
        "",
    ]
    return "\n".join(lines)


def speed_line(p, results):
    """How the size and speed columns were measured (kdexp/speed.py)."""
    agree = ", ".join("%s %s%%" % (n, "%.0f" % r["ct2_agreement"] if r["ct2_agreement"] is not None else "-")
                      for n, r in results.items())
    return ("- Sizes and speed (examples/kdexp/speed.py): checkpoint = `checkpoint_last.pt` as saved (with "
            "fairseq's optimizer state); CT2 int8 = every file of `kd-export --quantization int8`'s directory "
            "(model.bin, vocabularies, spm.model, notes); its greedy output equals fairseq's on %s of 20 valid "
            "sentences. Speed: the %d test sentences, after all training, one process at a time on %s, "
            "one thread each (OMP_NUM_THREADS=1; CTranslate2 intra_threads=1, inter_threads=1), beam %d, "
            "batches of %d (fairseq-generate's: ordered by source length), output cap floor(1.2 x (longest "
            "source of the batch + EOS) + 10) tokens in both paths; %d repetition(s) interleaved round-robin "
            "over systems and both paths (rotated each round), median shown; model loading excluded "
            "(fairseq-generate: its own timer of the decoding loop, run with `--cpu --num-workers 0`; "
            "CTranslate2: `translate_batch` calls timed, pieces in and out); CTranslate2's beam search keeps "
            "its defaults otherwise (length_penalty 1 as fairseq's --lenpen 1); both paths' hypotheses are "
            "detokenized alike and scored with the same sacreBLEU"
            % (agree, len(read_lines(p.path("corpus", "test.%s" % p.args.tgt_lang))), machine(), BEAM, BATCH,
               p.args.speed_reps))


def arch(s):
    """``layers E+D, d=..., ffn FE+FD, H heads`` of a shape (recipes.shape: encoder+decoder)."""
    return "layers %s+%s, d=%s, ffn %s+%s, %s heads (encoder+decoder)" % (
        s["encoder_layers"], s["decoder_layers"], s["dim"], s["encoder_ffn"], s["decoder_ffn"], s["heads"])


def _torch_threads():
    import torch

    return torch.get_num_threads()
