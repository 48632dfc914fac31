"""kd-dump-teacher and --teacher-cache: cached top-K equals the online teacher, same KD loss, sharding,
refusals, and a real training run that never loads a teacher."""
import contextlib
import json
import os
import pickle
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import kd_train, last_valid, run
from inproc import build, criterion_loss

from kd_plugin.checks import KDConfigError
from kd_plugin.cli import dump_teacher, fairseq_io
from kd_plugin.data.teacher_cache import check_cache_topk, load_teacher_cache
from kd_plugin.teacher import Teacher

K, BLOCK = 8, 32  # small blocks: the 100-sentence valid split has 4, so 2 shards are 2 blocks each
DUMP_FLAGS = ["--topk", K, "--max-tokens", 4000, "--block-size", BLOCK]
PARTS = (".lprobs.f16", ".ids.u16", ".rest.f16", ".idx", ".json")


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread, as the dumps in subprocesses do (bit-identical float32 results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dump_inproc(*args):
    """kd-dump-teacher's entry point in this process, on one thread."""
    with one_thread():
        dump_teacher.cli_main([str(a) for a in args])


def read_bytes(prefix):
    return {p: open(prefix + p, "rb").read() for p in PARTS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data_bin, teacher):
    out = str(tmp_path_factory.mktemp("cache") / "cache")
    for split in ("train", "valid"):
        log = run("kd-dump-teacher", "--data", data_bin, "--path", teacher, "--split", split, "--out", out,
                  *DUMP_FLAGS)
        assert "tokens/s" in log
    return out


def plain_task(data_bin, split="valid"):
    """The stock translation task the dumper runs on, with ``split`` loaded."""
    task = fairseq_io.setup_task(fairseq_io.fairseq_config(data_bin))
    return task, fairseq_io.load_split(task, split)


def dump_batches(task, dataset, models):
    args = SimpleNamespace(block_size=BLOCK, max_tokens=4000, batch_size=None, seed=1)
    return list(dump_teacher.teacher_batches(task, dataset, models, (0, len(dataset)), args))


@pytest.mark.parametrize("ensemble", [False, True])
def test_cached_topk_equals_online_teacher(data_bin, teacher, teacher2, cache, tmp_path, ensemble):
    """Every valid token: ids identical, log-probs = fp16 of the online teacher's, rest mass vs float64."""
    if ensemble:
        cache = str(tmp_path / "ens")
        dump_inproc("--data", data_bin, "--path", teacher + ":" + teacher2, "--split", "valid", "--out", cache,
                    *DUMP_FLAGS)
    task, dataset = plain_task(data_bin)
    tgt_dict = task.target_dictionary
    models, paths = fairseq_io.load_ensemble(teacher + (":" + teacher2 if ensemble else ""), task)
    online = Teacher(models, paths)
    cached = load_teacher_cache(cache, "valid", dataset, tgt_dict)
    header = json.load(open(os.path.join(cache, "valid.topk.json")))
    assert header["teacher_sha256"] == [fairseq_io.file_sha256(p) for p in paths]
    assert header["num_tokens"] == int(dataset.tgt_sizes.sum()) and header["count"] == len(dataset) == 100
    rest = np.memmap(os.path.join(cache, "valid.topk.rest.f16"), dtype="<f2", mode="r")
    offsets = np.fromfile(os.path.join(cache, "valid.topk.idx"), dtype="<i8")
    seen = 0
    with torch.no_grad(), one_thread():
        for sample in dump_batches(task, dataset, models):
            signal = online.signal(sample["net_input"], models[0], topk=K)
            probs = torch.stack([torch.softmax(m(**sample["net_input"])[0].double(), -1) for m in models]).mean(0)
            for b, i in enumerate(sample["id"].tolist()):
                n = int(dataset.tgt_sizes[i])
                lp, ids = cached[i]
                assert np.array_equal(ids, signal["topk_ids"][b, :n].numpy())
                assert np.array_equal(lp, signal["topk_lprobs"][b, :n].half().numpy())
                ref = torch.log1p(-probs[b, :n].gather(-1, torch.from_numpy(ids.astype(np.int64))).sum(-1))
                got = torch.from_numpy(rest[offsets[i]:offsets[i + 1]].astype(np.float64))
                assert torch.allclose(got, ref, rtol=2e-3, atol=1e-3), (got - ref).abs().max()
                seen += 1
    assert seen == len(dataset)
    # what DataLoader workers get: paths, no open maps or data; they open their own maps
    state = pickle.dumps(cached)
    assert len(state) < 4096 and np.array_equal(pickle.loads(state)[i][1], ids)
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # sorted, and not renormalized (sum < 1):
    assert (np.exp(lp.astype(np.float64)).sum(1) < 1).all()


def test_cached_loss_equals_online_topk_loss(data_bin, teacher, cache):
    """token_kd (T=2, top-8) with --teacher-cache vs --teacher-path on the same batch and student."""
    kd = ["--task", "translation_kd", "--criterion", "token_kd", "--kd-topk", K, "--kd-alpha", "0.5",
          "--kd-temperature", "2", "--label-smoothing", "0.1"]
    _, task_c, model, crit_c = build(data_bin, *kd, "--teacher-cache", cache)
    _, task_o, model_o, crit_o = build(data_bin, *kd, "--teacher-path", teacher)
    assert task_c.teacher is None and task_o.teacher is not None
    model_o.load_state_dict(model.state_dict())
    task_c.load_dataset("valid")
    task_o.load_dataset("valid")
    plain, dataset = plain_task(data_bin)
    ds_c, ds_o = task_c.dataset("valid"), task_o.dataset("valid")
    with one_thread():
        for batch in dump_batches(plain, dataset, task_o.teacher.models)[:2]:
            ids = batch["id"].tolist()
            s_c = ds_c.collater([ds_c[i] for i in ids])
            s_o = ds_o.collater([ds_o[i] for i in ids])
            assert "teacher" in s_c and "teacher" not in s_o
            loss_c, size_c, log_c = criterion_loss(task_c, model, crit_c, s_c)
            loss_o, size_o, log_o = criterion_loss(task_o, model_o, crit_o, s_o)
            assert size_c == size_o
            assert loss_c.item() == pytest.approx(loss_o.item(), rel=1e-4)
            assert log_c["kd_loss"].item() == pytest.approx(log_o["kd_loss"].item(), rel=1e-3)
            # the collated signal itself: same order and padding as the target
            signal = task_o.teacher.signal(s_o["net_input"], model_o, topk=K)
            mask = s_c["target"].ne(task_c.target_dictionary.pad())
            assert torch.equal(s_c["teacher"]["topk_ids"][mask], signal["topk_ids"][mask])
            assert torch.equal(s_c["teacher"]["topk_lprobs"][mask], signal["topk_lprobs"][mask].half().float())
            assert not s_c["teacher"]["topk_lprobs"][~mask].any() and not s_c["teacher"]["topk_ids"][~mask].any()


def test_sharded_dump_merges_byte_identical_and_overwrite_is_refused(data_bin, teacher, cache, tmp_path):
    out = str(tmp_path / "sharded")
    for i in range(2):
        dump_inproc("--data", data_bin, "--path", teacher, "--split", "valid", "--out", out, *DUMP_FLAGS,
                    "--num-shards", 2, "--shard-id", i)
    shard0 = json.load(open(os.path.join(out, "shards", "valid.topk.shard0of2.json")))
    assert shard0["range"] == [0, 64]  # whole blocks of 32
    dump_inproc("merge", "--out", out, "--split", "valid")
    reference = read_bytes(os.path.join(cache, "valid.topk"))
    assert read_bytes(os.path.join(out, "valid.topk")) == reference  # header included

    # existing output: refused (exit status 2, one message), nothing touched; --overwrite replaces
    with pytest.raises(SystemExit) as e:
        dump_inproc("merge", "--out", out, "--split", "valid")
    assert e.value.code == 2
    dump_inproc("merge", "--out", out, "--split", "valid", "--overwrite")
    assert read_bytes(os.path.join(out, "valid.topk")) == reference
    log = run("kd-dump-teacher", "--data", data_bin, "--path", teacher, "--split", "valid", "--out", cache,
              *DUMP_FLAGS, expect_ok=False)
    assert "valid.topk" in log and "already exists (pass --overwrite" in log
    assert read_bytes(os.path.join(cache, "valid.topk")) == reference


def _copy(cache, split, dest, as_split=None):
    os.makedirs(dest, exist_ok=True)
    for p in PARTS:
        shutil.copy(os.path.join(cache, split + ".topk" + p), os.path.join(dest, (as_split or split) + ".topk" + p))
    return dest


def test_mismatched_cache_is_refused(data_bin, teacher, cache, tmp_path):
    _, task, model, crit = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd",
                                 "--kd-topk", K, "--teacher-cache", cache)

    def refused(directory, split, *match):
        task.cfg.teacher_cache = directory
        with pytest.raises(KDConfigError) as e:
            task.load_dataset(split)
        msg = str(e.value)
        assert "--teacher-cache" in msg and all(m in msg for m in match), msg

    # another split's cache (valid and test both have 100 sentences)
    wrong = _copy(cache, "valid", str(tmp_path / "wrong"), as_split="test")
    refused(wrong, "test", "test.topk.json", "dumped for the 'valid' split, not 'test'")
    header = json.load(open(os.path.join(wrong, "test.topk.json")))
    json.dump(dict(header, split="test"), open(os.path.join(wrong, "test.topk.json"), "w"))
    refused(wrong, "test", "test.topk.json", "gold target has", "other data")
    # no cache for the split at all
    refused(wrong, "valid", "valid.topk.json not found")
    # a truncated file
    cut = _copy(cache, "valid", str(tmp_path / "cut"))
    with open(os.path.join(cut, "valid.topk.lprobs.f16"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 10)
    refused(cut, "valid", "valid.topk.lprobs.f16", "truncated")
    # K smaller than --kd-topk: refused at start-up (check_cache_topk, when the criterion is built) ...
    assert check_cache_topk(cache, K) == K
    with pytest.raises(KDConfigError, match=r"--kd-topk 16 exceeds K=8 .*\.topk\.json"):
        check_cache_topk(cache, 16)
    with pytest.raises(KDConfigError, match=r"--kd-topk 16 exceeds K=8 .*\.topk\.json"):
        build(data_bin, "--task", "translation_kd", "--criterion", "token_kd", "--kd-topk", 16,
              "--teacher-cache", cache)
    # ... and, should a criterion ask for more than the signal holds later on, on its first batch
    task.cfg.teacher_cache = cache
    task.load_dataset("valid")
    sample = task.dataset("valid").collater([task.dataset("valid")[i] for i in range(4)])
    crit.topk = 16
    with pytest.raises(ValueError, match="--kd-topk 16 exceeds the teacher signal's K=8"):
        criterion_loss(task, model, crit, sample)

    # another target dictionary: the same binarized data with one more target type
    other = tmp_path / "other_dict"
    other.mkdir()
    for name in os.listdir(data_bin):
        os.symlink(os.path.join(data_bin, name), other / name)
    (other / "dict.tgt.txt").unlink()
    shutil.copy(os.path.join(data_bin, "dict.tgt.txt"), other / "dict.tgt.txt")
    with open(other / "dict.tgt.txt", "a") as f:
        f.write("zzz 1\n")
    _, task2, _, _ = build(str(other), "--task", "translation_kd", "--criterion", "token_kd",
                           "--teacher-cache", cache)
    with pytest.raises(KDConfigError, match="another target dictionary"):
        task2.load_dataset("valid")


def _refusal(task, directory, on_batch=False):
    """The one-line message with which the task refuses ``directory`` as --teacher-cache for the valid split:
    when it loads the split, or (``on_batch``, the value checks) when it collates its first 8 sentences."""
    task.cfg.teacher_cache = directory
    if on_batch:
        task.load_dataset("valid")
        dataset = task.dataset("valid")
    with pytest.raises((KDConfigError, FloatingPointError)) as e:
        if on_batch:
            dataset.collater([dataset[i] for i in range(8)])
        else:
            task.load_dataset("valid")
    message = str(e.value)
    assert "--teacher-cache" in message and "\n" not in message, message
    return message


def test_cache_with_bad_contents_is_refused_naming_the_file(data_bin, teacher, cache, tmp_path):
    """NaN values, per-sentence lengths that differ from the data, unmerged shards, a corrupt header."""
    _, task, _, _ = build(data_bin, "--task", "translation_kd", "--criterion", "token_kd", "--kd-topk", K,
                          "--teacher-cache", cache)
    for part in (".lprobs.f16", ".rest.f16"):
        bad = _copy(cache, "valid", str(tmp_path / ("nan" + part.split(".")[1])))
        values = np.memmap(os.path.join(bad, "valid.topk" + part), dtype="<f2", mode="r+")
        values[3] = np.nan
        values.flush()
        del values
        msg = _refusal(task, bad, on_batch=True)
        assert os.path.join(bad, "valid.topk" + part) in msg and "NaN" in msg

    # sentence 0 one token longer, sentence 1 one shorter: sizes and total agree, lengths do not
    moved = _copy(cache, "valid", str(tmp_path / "moved"))
    offsets = np.fromfile(os.path.join(moved, "valid.topk.idx"), dtype="<i8")
    offsets[1] += 1
    offsets.tofile(os.path.join(moved, "valid.topk.idx"))
    msg = _refusal(task, moved)
    assert os.path.join(moved, "valid.topk.json") in msg and "for sentence 0 but its gold target has" in msg

    # one shard of two, never merged: no header for the split; the shard's files renamed as the split's
    sharded = str(tmp_path / "sharded")
    dump_inproc("--data", data_bin, "--path", teacher, "--split", "valid", "--out", sharded, *DUMP_FLAGS,
                "--num-shards", 2, "--shard-id", 0)
    msg = _refusal(task, sharded)
    assert os.path.join(sharded, "valid.topk.json") + " not found" in msg
    renamed = str(tmp_path / "renamed")
    os.makedirs(renamed)
    for part in PARTS:
        shutil.copy(os.path.join(sharded, "shards", "valid.topk.shard0of2" + part),
                    os.path.join(renamed, "valid.topk" + part))
    msg = _refusal(task, renamed)
    assert os.path.join(renamed, "valid.topk.json") in msg and "kd-dump-teacher merge" in msg

    # a header that is not JSON, and JSON that is not a cache header
    corrupt = _copy(cache, "valid", str(tmp_path / "corrupt"))
    header = os.path.join(corrupt, "valid.topk.json")
    with open(header, "w") as f:
        f.write('{"format": "kd-teacher-topk", "version": ')
    msg = _refusal(task, corrupt)
    assert header in msg and "not a valid cache header" in msg
    with open(header, "w") as f:
        json.dump({"format": "something-else", "version": 1}, f)
    msg = _refusal(task, corrupt)
    assert header in msg and "is not a kd-teacher-topk v1 header" in msg


def test_hybrid_served_by_the_cache_alone(data_bin, cache, teacher_targets, tmp_path):
    """A cache directory that also holds the teacher-decoded targets serves hybrid_kd with --teacher-cache
    alone (no teacher loaded): same samples and loss as naming the targets with --teacher-targets."""
    both = tmp_path / "both"
    both.mkdir()
    for name in os.listdir(teacher_targets):
        os.symlink(os.path.join(teacher_targets, name), both / name)
    for part in PARTS:
        os.symlink(os.path.join(cache, "valid.topk" + part), both / ("valid.topk" + part))
    hybrid = ["--task", "translation_kd", "--criterion", "hybrid_kd", "--kd-topk", K, "--kd-gate", "fixed:0.4",
              "--label-smoothing", "0.1"]
    _, task, model, crit = build(data_bin, *hybrid, "--teacher-cache", str(both))
    _, ref_task, _, ref_crit = build(data_bin, *hybrid, "--teacher-cache", cache, "--teacher-targets", teacher_targets)
    assert task.teacher is None
    for t in (task, ref_task):
        t.load_dataset("valid")
    ids = list(range(0, 100, 7))
    sample = task.dataset("valid").collater([task.dataset("valid")[i] for i in ids])
    ref = ref_task.dataset("valid").collater([ref_task.dataset("valid")[i] for i in ids])
    assert torch.equal(sample["teacher_target"], ref["teacher_target"])
    assert not torch.equal(sample["teacher_target"][:, :sample["target"].size(1)],
                           sample["target"][:, :sample["teacher_target"].size(1)])
    loss, size, log = criterion_loss(task, model, crit, sample)
    ref_loss, ref_size, ref_log = criterion_loss(ref_task, model, ref_crit, ref)
    assert loss.item() == ref_loss.item() and size == ref_size
    assert log["kd_loss"].item() > 0 and log["sent_nll_loss"].item() > 0


def test_training_from_cache_with_workers(data_bin, cache, tmp_path):
    """fairseq-train on the cache alone (no teacher loaded), 2 data-loader workers, 2 epochs."""
    log = kd_train(data_bin, str(tmp_path / "student"), "--teacher-cache", cache, "--criterion", "token_kd",
                   "--kd-topk", K, "--num-workers", "2", "--max-epoch", "2", "--max-tokens", "4000",
                   "--log-interval", "1", max_update=100)
    assert "teacher cache" in log and "train split, K=8" in log
    assert "| kd_plugin.teacher |" not in log and not re.search(r"teacher \S+: \d+ parameters", log)
    assert "end of epoch 2" in log
    assert 0 < last_valid(log, "kd_loss") < 10
    assert os.path.isfile(str(tmp_path / "student" / "checkpoint_last.pt"))
