"""sentence_kd: NLL on teacher-decoded targets, gold mixing, real training and stock decoding."""
import math
import os

import numpy as np
import pytest
import torch

from helpers import kd_train, last_valid, load_state, run
from inproc import build, criterion_loss, first_batch


def _setup(data_bin, teacher_targets, *extra):
    _, task, model, crit = build(data_bin, "--task", "translation_kd", "--criterion", "sentence_kd",
                                 "--teacher-targets", teacher_targets, "--label-smoothing", "0.1", "--dropout", "0",
                                 *extra)
    _, _, ref_model, ref = build(data_bin, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                                 "--dropout", "0")
    ref_model.load_state_dict(model.state_dict())
    return task, model, crit, ref_model, ref


def _with_target(sample, target, prev):
    return dict(sample, target=target, ntokens=int(target.ne(1).sum()),
                net_input=dict(sample["net_input"], prev_output_tokens=prev))


def test_pure_sentence_kd_is_ls_ce_on_teacher_output(data_bin, teacher_targets):
    task, model, crit, ref_model, ref = _setup(data_bin, teacher_targets)
    sample = first_batch(task)
    assert not torch.equal(sample["teacher_target"], sample["target"][:, :sample["teacher_target"].size(1)])
    loss, size, _ = criterion_loss(task, model, crit, sample, train=True)
    ref_model.train()
    ref_loss, ref_size, _ = ref(ref_model, _with_target(sample, sample["teacher_target"],
                                                       sample["teacher_net_input"]["prev_output_tokens"]))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and size == ref_size


def test_gold_mix_one_is_ls_ce_on_gold_and_half_mixes(data_bin, teacher_targets):
    task, model, crit, ref_model, ref = _setup(data_bin, teacher_targets, "--kd-gold-mix", "1")
    sample = first_batch(task)
    loss, size, _ = criterion_loss(task, model, crit, sample, train=True)
    ref_model.train()
    ref_loss, ref_size, _ = ref(ref_model, sample)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and size == ref_size
    # validation never mixes: it is LS-CE on the teacher's output, which differs from gold in this batch
    assert not torch.equal(sample["teacher_target"], sample["target"][:, :sample["teacher_target"].size(1)])
    val_loss, _, _ = criterion_loss(task, model, crit, sample, train=False)
    ref_model.eval()
    ref_val, _, _ = ref(ref_model, _with_target(sample, sample["teacher_target"],
                                                sample["teacher_net_input"]["prev_output_tokens"]))
    assert val_loss.item() == pytest.approx(ref_val.item(), rel=1e-6)
    crit.gold_mix = 0.5
    crit.train()
    torch.manual_seed(0)
    mixed = crit.sentence_sample(sample)
    gold_rows = [torch.equal(mixed["target"][i, :sample["target"].size(1)], sample["target"][i])
                 for i in range(sample["target"].size(0))]
    assert 0.25 < sum(gold_rows) / len(gold_rows) < 0.75


def stock_eval(data, checkpoint):
    """(task, student, criterion, batch): ``checkpoint``'s weights in a stock translation model on ``data``,
    stock label_smoothed_cross_entropy (0.1), the whole valid split (100 sentences) in one batch."""
    _, task, model, crit = build(data, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")
    model.load_state_dict(load_state(checkpoint)["model"])
    model.eval()
    sample = first_batch(task, max_tokens=100000)
    assert sample["target"].size(0) == 100
    return task, model, crit, sample


def stock_ls_ce(data, checkpoint):
    """Stock fairseq's LS-CE of ``checkpoint`` on the valid targets of ``data``, nats per target token."""
    _, model, crit, sample = stock_eval(data, checkpoint)
    with torch.no_grad():
        loss, size, _ = crit(model, sample)
    return loss.item() / size


def with_valid_targets(data_bin, directory, dest):
    """``dest``: ``data_bin`` (symlinked) whose valid targets are the teacher-decoded ones in ``directory``
    (kd-distill-corpus writes them in fairseq-preprocess's format, so stock fairseq reads them)."""
    os.makedirs(dest)
    for name in os.listdir(data_bin):
        target = name.startswith("valid.src-tgt.tgt.")
        os.symlink(os.path.join(directory if target else data_bin, name), os.path.join(dest, name))
    return dest


def optional_word_mass(data, checkpoint):
    """Mean probability ``checkpoint`` gives the optional words c<i> (gold: after b<i> with probability 0.3) at
    each target position of the valid split, teacher-forced on its gold targets."""
    task, model, _, sample = stock_eval(data, checkpoint)
    optional = torch.tensor([sym.startswith("c") for sym in task.target_dictionary.symbols])
    with torch.no_grad():
        probs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=False).double()
    mass = probs[..., optional].sum(-1)
    return mass[sample["target"].ne(task.target_dictionary.pad())].mean().item()


def terse_system(data_bin, dest):
    """A teacher corpus from another system (kd-distill-corpus from-text): each gold target of the train and
    valid splits without its optional words, i.e. a system that never writes c<i>."""
    text = os.path.join(os.path.dirname(data_bin), "text")  # the data_bin fixture's source text
    for split in ("train", "valid"):
        with open(os.path.join(text, split + ".tgt")) as f:
            lines = [" ".join(w for w in line.split() if not w.startswith("c")) for line in f]
        hyp = os.path.join(os.path.dirname(dest), split + ".terse.txt")
        with open(hyp, "w") as f:
            f.write("\n".join(lines) + "\n")
        run("kd-distill-corpus", "from-text", "--data", data_bin, "--split", split, "--text", hyp, "--out", dest)
    return dest


def test_sentence_kd_learns_the_teacher_outputs_and_decodes_with_stock_fairseq(data_bin, tmp_path):
    """Two students, same seed and budget: pure sentence_kd (p = 0) and --kd-gold-mix 1 (gold only), from a
    teacher corpus that never has the gold targets' optional words c<i> (after b<i> with probability 0.3). The KD
    student learns to give those words far less probability than the gold student (teacher-forced on the gold
    valid targets). A criterion that ignored the teacher's targets or the mix would train two identical
    students. (The toy teacher's beam output keeps those words at about the gold rate, 23.6% vs 23.0% of the
    train tokens when measured, so it cannot show this.)"""
    targets = terse_system(data_bin, str(tmp_path / "terse"))
    decoded = with_valid_targets(data_bin, targets, str(tmp_path / "decoded-bin"))
    mass = {}
    for mix in ("0", "1"):
        save = str(tmp_path / ("s" + mix))
        log = kd_train(data_bin, save, "--criterion", "sentence_kd", "--teacher-targets", targets,
                       "--label-smoothing", "0.1", "--kd-gold-mix", mix, max_update=60)
        ckpt = save + "/checkpoint_last.pt"
        mass[mix] = optional_word_mass(data_bin, ckpt)
        # fairseq-train validates sentence_kd on the teacher's outputs, whatever the mix
        assert last_valid(log) == pytest.approx(stock_ls_ce(decoded, ckpt) / math.log(2), abs=2e-3)
    assert mass["0"] < 0.5 * mass["1"], mass  # measured: 0.050 vs 0.211
    out = run("fairseq-generate", data_bin, "--path", str(tmp_path / "s0" / "checkpoint_last.pt"),
              "--gen-subset", "valid", "--beam", "2", "--batch-size", "64")
    assert sum(line.startswith("H-") for line in out.splitlines()) == 100


def test_batches_count_only_the_targets_the_loss_runs_on(data_bin, teacher_targets):
    """Without gold mix, sentence_kd batches by max(source, teacher output): gold lengths would only waste
    batch room. A loss that also trains on gold counts max(source, gold, teacher output), also for datasets
    loaded before the criterion was built (fairseq-train loads valid first)."""
    cfg, task, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "sentence_kd",
                            "--teacher-targets", teacher_targets)
    task.load_dataset("train")
    ds = task.dataset("train")
    src, gold, decoded = ds.dataset.src_sizes, ds.dataset.tgt_sizes, ds.extras[0].sizes
    idx = np.arange(len(ds))
    with_gold = np.maximum(np.maximum(src, gold), decoded)
    assert (ds.num_tokens_vec(idx) == np.maximum(src, decoded)).all()
    assert (ds.num_tokens_vec(idx) < with_gold).sum() > len(ds) // 20
    batches = lambda: len(task.get_batch_iterator(ds, max_tokens=300, seed=1, disable_iterator_cache=True))
    fewer = batches()
    # ordered (for batching) by the lengths batching counts, as fairseq orders by its own
    order = ds.ordered_indices()
    assert (np.diff(src[order]) >= 0).all()
    assert all((np.diff(decoded[order][src[order] == n]) >= 0).all() for n in np.unique(src))
    cfg.criterion.kd_gold_mix = 0.5
    task.build_criterion(cfg.criterion)
    assert (ds.num_tokens_vec(idx) == with_gold).all() and batches() > fewer


def test_gold_batched_order_is_fairseqs(data_bin, teacher_targets):
    """With gold lengths in batching (token_kd, hybrid_kd...) and no longer teacher output, the order, and so
    the batches, are exactly those of fairseq's own translation task."""
    _, task, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "sentence_kd",
                          "--teacher-targets", teacher_targets, "--kd-gold-mix", "0.5")
    _, plain, _, _ = build(data_bin)
    for t in (task, plain):
        t.load_dataset("train")
    ds, ref = task.dataset("train"), plain.dataset("train")
    ds.extras[0].sizes = np.minimum(ds.extras[0].sizes, ref.tgt_sizes)  # as if never longer than gold
    ds._sizes.clear()  # batching lengths are recomputed from the changed sizes
    np.random.seed(3)
    order = ds.ordered_indices()
    np.random.seed(3)
    assert (order == ref.ordered_indices()).all() and not (order == np.arange(len(ds))).all()
