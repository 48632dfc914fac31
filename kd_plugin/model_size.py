"""Parameter counts of fairseq models, as the demo, the teacher log and kd-advise report them."""
from kd_plugin.fairseq_patches.fixes import WEIGHT_COPIES


def is_weight_copy(name):
    """Whether a model parameter / state-dict key is one of the encoder layers' copies of their own weights for
    torch's fast path (``encoder.layers.N.fc1_weight``..., kd_plugin.fairseq_patches.fixes.WEIGHT_COPIES): they
    are not model parameters and are left out of parameter counts."""
    layer, _, attr = name.rpartition(".")
    return attr in WEIGHT_COPIES and layer.split(".")[-2:-1] == ["layers"]


def count_parameters(named_tensors):
    """Model parameters among ``(name, tensor)`` pairs (a state dict's items or ``named_parameters()``): float
    tensors, each storage once (shared embeddings), without the encoder layers' weight copies
    (:func:`is_weight_copy`) and fairseq's ``_float_tensor`` / ``version`` buffers."""
    seen, total = set(), 0
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or name.endswith(("_float_tensor", ".version")) or is_weight_copy(name):
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.numel()
    return total
