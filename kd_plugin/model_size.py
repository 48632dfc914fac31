"""Parameter counts of fairseq models, as the demo, the teacher log and kd-advise report them."""
from kd_plugin.compat import is_weight_copy


def count_parameters(named_tensors):
    """Model parameters among ``(name, tensor)`` pairs (a state dict's items or ``named_parameters()``): float
    tensors, each storage once (shared embeddings), without the encoder layers' BetterTransformer weight
    copies (kd_plugin.compat.is_weight_copy) and fairseq's ``_float_tensor`` / ``version`` buffers."""
    seen, total = set(), 0
    for name, tensor in named_tensors:
        if not tensor.is_floating_point() or name.endswith(("_float_tensor", ".version")) or is_weight_copy(name):
            continue
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.numel()
    return total
