"""The demo's speed phase (examples/kdexp/speed.py), its pure pieces against fairseq's own code: the parser of
fairseq-generate's speed line, the batches and output cap of the CTranslate2 path, the interleaved schedule,
the export command (kd-export's own check, not bypassed); and the per-side architecture flags of the demo's
commands (kdexp/recipes.py). End to end: tests/test_demo.py."""
import argparse
import os
import random
import re

import numpy as np
import torch
from kdexp import options, recipes
from kdexp import report as demo_report
from kdexp import speed as demo_speed


def test_parser_reads_fairseq_generates_own_summary_line():
    """The line built with the format string of the installed fairseq_cli/generate.py, and one from a log."""
    import fairseq_cli.generate as generate

    with open(generate.__file__) as f:
        fmt = re.search(r'"(Translated \{.*?)"', f.read()).group(1)
    line = "2026-11-30 15:18:53 | INFO | fairseq_cli.generate | " + fmt.format(1000, 18430, 7.6012, 131.557, 2424.7)
    assert demo_speed.parse_generate_speed("noise\n" + line + "\nGenerate test ...") == (1000, 7.6, 131.56)
    logged = "fairseq_cli.generate | Translated 40 sentences (412 tokens) in 0.3s (143.27 sentences/s, 1475.7 tokens/s)"
    assert demo_speed.parse_generate_speed(logged) == (40, 0.3, 143.27)
    assert demo_speed.parse_generate_speed("no summary") is None


def test_batches_are_fairseq_generates():
    """Same ids in the same batches as fairseq's test iterator (LanguagePairDataset without shuffling,
    batch_by_size with --batch-size 64), on sizes with many ties; the cap is fairseq's rule on the padded
    source width (longest source + EOS)."""
    from fairseq.data import Dictionary, LanguagePairDataset

    rng = random.Random(3)
    for n, lengths in ((300, [64, 64, 64, 64, 40, 4]), (1000, [64] * 15 + [40]), (7, [7]), (65, [64, 1])):
        src_sizes = [rng.randint(1, 12) for _ in range(n)]
        tgt_sizes = [rng.randint(1, 12) for _ in range(n)]
        d = Dictionary()
        src = [torch.full((k + 1,), 4) for k in src_sizes]  # binarized: pieces + EOS
        tgt = [torch.full((k + 1,), 4) for k in tgt_sizes]
        dataset = LanguagePairDataset(src, np.array(src_sizes) + 1, d, tgt, np.array(tgt_sizes) + 1, d,
                                      shuffle=False)
        theirs = dataset.batch_by_size(dataset.ordered_indices(), max_tokens=None, max_sentences=64,
                                       required_batch_size_multiple=8)
        ours = demo_speed.batches(src_sizes, tgt_sizes, 64)
        assert [list(b) for b in theirs] == ours and [len(b) for b in ours] == lengths
        for ids in ours:
            width = dataset.collater([dataset[i] for i in ids])["net_input"]["src_tokens"].size(1)
            assert demo_speed.max_len(max(src_sizes[i] for i in ids), 1.2, 10) == int(1.2 * width + 10)


def test_detokenize_is_fairseqs_remove_bpe_sentencepiece():
    from fairseq.data.data_utils import post_process

    pieces = ["\u2581Das", "\u2581ist", "\u2581ein", "\u2581Te", "st", "."]
    assert demo_speed.detokenize(pieces) == post_process(" ".join(pieces), "sentencepiece") == "Das ist ein Test."


def test_schedule_interleaves_systems_and_paths():
    systems = ["teacher", "plain", "token", "sentence", "hybrid"]
    plan = demo_speed.schedule(systems, 3)
    assert len(plan) == 3 * len(systems) * 2
    for r in range(3):
        round_ = [(name, path) for rep, name, path in plan if rep == r]
        assert sorted(round_) == sorted((s, p) for s in systems for p in demo_speed.PATHS)
        assert [name for name, _ in round_[::2]] == systems[r:] + systems[:r]  # rotated
        assert round_[0][1] == demo_speed.PATHS[r % 2]  # paths alternate their order
    assert [rep for rep, _, _ in plan] == sorted(rep for rep, _, _ in plan)  # round after round


def test_per_side_architecture_flags_default_to_the_shared_ones():
    a = options.parse_args(["--student-encoder-layers", "3", "--student-decoder-ffn", "96", "--teacher-ffn", "300"])
    flags = dict(zip(*[iter(recipes.model_args(a, "student")[3:])] * 2))
    assert flags == {"--encoder-layers": 3, "--decoder-layers": 1, "--encoder-embed-dim": 64,
                     "--decoder-embed-dim": 64, "--encoder-ffn-embed-dim": 256, "--decoder-ffn-embed-dim": 96,
                     "--encoder-attention-heads": 2, "--decoder-attention-heads": 2}
    teacher = dict(zip(*[iter(recipes.model_args(a, "teacher")[3:])] * 2))
    assert teacher["--encoder-ffn-embed-dim"] == teacher["--decoder-ffn-embed-dim"] == 300
    assert demo_report.arch(recipes.shape(a, "student")) == "layers 3+1, d=64, ffn 256+96, 2 heads (encoder+decoder)"


def test_params_are_the_models_trainable_parameters(data_bin, tmp_path):
    """recipes.count_params of a saved checkpoint = the trainable parameters of the model fairseq builds (shared
    embeddings once), not counting fairseq's frozen BetterTransformer copies of encoder weights, which the
    checkpoint does hold; for a 2+1-layer shape too."""
    from inproc import build

    arch = ["--arch", "transformer", "--share-decoder-input-output-embed", "--encoder-layers", "2", "--decoder-layers", "1",
            "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
            "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
    _, _, model, _ = build(data_bin, "--criterion", "cross_entropy", arch=arch)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": model.state_dict()}, path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from kd_plugin.model_size import is_weight_copy

    assert any(is_weight_copy(k) for k in model.state_dict())  # the copies are really saved
    assert recipes.count_params(path) == trainable


def test_export_keeps_kd_exports_check(tmp_path):
    """The demo's export step is kd-export int8 with the demo's output cap and kd-export's default threshold
    (no --min-agreement of its own: a failed check stops the demo)."""
    from kd_plugin.cli import export

    calls = []

    class Pipeline:
        args = argparse.Namespace(src_lang="de", tgt_lang="en")

        def path(self, *parts):
            return os.path.join(str(tmp_path), *parts)

        def run(self, step, cmd):
            calls.append((step, [str(c) for c in cmd]))

    demo_speed.export(Pipeline(), "plain", "plain.pt")
    [(step, cmd)] = calls
    assert step == "export-plain" and os.path.basename(cmd[0]) == "kd-export"
    args = export.get_parser().parse_args(cmd[1:])
    assert not any(c.startswith("--min-agreement") for c in cmd)
    assert args.min_agreement == export.DEFAULT_MIN_AGREEMENT and args.check > 0
    assert (args.quantization, args.max_len_a, args.max_len_b, args.path) == ("int8", 1.2, 10, "plain.pt")
    assert args.out == os.path.join(str(tmp_path), "export", "plain")
