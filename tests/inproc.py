"""Build fairseq's task, model and criterion in-process from command-line style arguments."""
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from helpers import TINY_ARCH, USER_DIR


def build(data_bin, *extra, arch=TINY_ARCH, seed=1):
    """(cfg, task, model, criterion) as fairseq-train would build them, before any update."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_bin, "--user-dir", USER_DIR, *arch, *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    torch.manual_seed(seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def first_batch(task, split="valid", max_tokens=400, seed=1):
    """The first batch of ``split`` (loaded on demand), as fairseq would collate it."""
    if split not in task.datasets:
        task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, seed=seed).next_epoch_itr(
        shuffle=False)
    return next(iter(itr))


def criterion_loss(task, model, criterion, sample, train=False):
    """(loss, sample_size, logging_output) through the task's own step (teacher signals included)."""
    sample = dict(sample)
    model.train(train)
    criterion.train(train)
    task.add_teacher_signal(sample, model)
    with torch.set_grad_enabled(train):
        return criterion(model, sample)


def cast_sample(sample, dtype):
    """What Trainer._prepare_sample does under --fp16 / --bf16: float32 tensors only."""
    return utils.apply_to_sample(lambda t: t.to(dtype) if t.dtype is torch.float32 else t, sample)
