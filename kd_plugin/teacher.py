r"""Loading and running the teacher (one checkpoint or an ensemble) for the translation_kd task.

The ensemble's distribution is the average of the members' probabilities:
    log p(y) = logsumexp_m log p_m(y) - log M
The teacher lives in the task (never in the model or criterion), so it is never saved with the student.
"""
import logging
import math
import os

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, models

from kd_plugin.checks import KDConfigError, check_dictionaries_match, check_finite
from kd_plugin.model_size import count_parameters
from kd_plugin.signals import topk_signal

logger = logging.getLogger(__name__)


def read_checkpoint(path, flag="--teacher-path"):
    """A fairseq checkpoint's state dict, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise KDConfigError("%s: teacher checkpoint not found: %s" % (flag, path))
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise KDConfigError(
            "%s: %s is not a readable fairseq checkpoint (%s: %s)" % (flag, path, type(e).__name__, e)
        ) from None
    if not isinstance(state, dict) or "model" not in state or state.get("cfg") is None:
        raise KDConfigError("%s: %s is not a fairseq checkpoint (no 'model'/'cfg' entries)" % (flag, path))
    return state


def load_members(spec, task, flag="--teacher-path"):
    """The checkpoints in ``spec`` (``A.pt[:B.pt...]``) as frozen eval-mode models for ``task``, and their paths.

    Every member must use the task's source and target dictionaries (kd_plugin.checks).
    """
    paths = [p for p in spec.split(":") if p]
    if not paths:
        raise KDConfigError("%s is empty" % flag)
    members = []
    for path in paths:
        state = read_checkpoint(path, flag)
        check_dictionaries_match(path, state, task)
        model = models.build_model(state["cfg"].model, task, from_checkpoint=True)
        model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        members.append(model)
        logger.info("teacher %s: %d parameters", path,
                    count_parameters(model.named_parameters()))
    return members, paths


class Teacher:
    """A frozen teacher ensemble producing token-level signals for the criterions."""

    def __init__(self, members, paths):
        self.models = members
        self.paths = paths
        self.fp32_reruns = 0  # half-precision batches recomputed in float32 (see _logits)

    @classmethod
    def load(cls, spec, task, flag="--teacher-path"):
        """``spec`` is ``A.pt[:B.pt...]``; every member must use the task's dictionaries."""
        return cls(*load_members(spec, task, flag))

    def _follow(self, ref):
        """Put the teacher on the student's device and dtype (once, on first use)."""
        for i, m in enumerate(self.models):
            p = next(m.parameters())
            if p.device != ref.device or p.dtype != ref.dtype:
                self.models[i] = m.to(device=ref.device, dtype=ref.dtype)

    def _logits(self, i, net_input):
        """Member i's logits; a half-precision member whose logits are not finite (fp16 overflows above
        65504) reruns the batch in float32, so --fp16 never turns a sound teacher into a crash. Non-finite
        logits in float32 are a broken teacher: FloatingPointError naming the checkpoint."""
        m = self.models[i]
        x = m(**net_input)[0]
        if x.dtype != torch.float32 and not torch.isfinite(x).all():
            half = x.dtype
            self.fp32_reruns += 1
            logger.warning("teacher %s: non-finite %s logits, batch recomputed in float32 (%d so far)",
                           self.paths[i], half, self.fp32_reruns)
            x = m.float()(**net_input)[0]
            m.to(dtype=half)
        # one fp32 reduction instead of a B x T x V bool tensor: the sum is NaN/inf iff an element is (|logits|
        # are far below 3e38 / numel), and the check was ~10% of kd-dump-teacher's time (benchmarks/profile_dump.py)
        check_finite(x.sum(dtype=torch.float32), "teacher %s produced NaN/inf logits" % self.paths[i])
        return x

    def signal(self, net_input, student, topk=0):
        """Teacher log-probs for the gold prefix in ``net_input``: a signal dict (see kd_plugin.signals),
        float32 whatever the student's dtype (log_softmax computed in float32)."""
        self._follow(next(student.parameters()))
        with torch.inference_mode():
            logits = [self._logits(i, net_input) for i in range(len(self.models))]
        with torch.no_grad():  # outside inference mode: results are ordinary tensors usable in autograd
            lps = [F.log_softmax(x, dim=-1, dtype=torch.float32) for x in logits]
            lprobs = lps[0] if len(lps) == 1 else torch.logsumexp(torch.stack(lps), 0) - math.log(len(lps))
            return topk_signal(lprobs, topk) if topk else {"lprobs": lprobs}
