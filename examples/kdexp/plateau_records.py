"""The plateau study's records file (docs/plateau_results.json): a JSON list, one record per line, in which each
per-sentence BLEU statistics list (``bleu_stats``: sacrebleu's [hyp_len, ref_len, correct_1..4, total_1..4] per
test sentence, what the paired bootstrap resamples) is stored packed and decoded back exactly on load.

Packed form: {"packed": "sacrebleu-stats-v1", "sentences": N, "data": base64(zlib(int32 little-endian rows of
[hyp_len, ref_len, correct_1..4]))}. The totals are not stored: with sacrebleu's n-gram counting,
total_n = max(0, hyp_len - n + 1), asserted when packing, so decoding rebuilds them and round-trips exactly.
"""
import base64
import json
import os
import zlib

import numpy as np

PACKED = "sacrebleu-stats-v1"
ORDER = 4


def totals(hyp_len):
    return [max(0, hyp_len - n + 1) for n in range(1, ORDER + 1)]


def pack(stats):
    """Per-sentence statistics -> their packed form; refuses a row whose totals are not its length's."""
    for row in stats:
        if len(row) != 2 + 2 * ORDER or list(row[2 + ORDER:]) != totals(row[0]):
            raise ValueError("BLEU statistics row %r: totals are not max(0, hyp_len - n + 1)" % (row,))
    kept = np.asarray([list(row[:2 + ORDER]) for row in stats], dtype="<i4").reshape(-1, 2 + ORDER)
    data = base64.b64encode(zlib.compress(kept.tobytes(), 9)).decode("ascii")
    return {"packed": PACKED, "sentences": len(stats), "data": data}


def unpack(packed):
    if packed.get("packed") != PACKED:
        raise ValueError("unknown packed BLEU statistics %r" % packed.get("packed"))
    kept = np.frombuffer(zlib.decompress(base64.b64decode(packed["data"])), dtype="<i4")
    kept = kept.reshape(packed["sentences"], 2 + ORDER)
    return [[int(x) for x in row] + totals(int(row[0])) for row in kept]


def _convert(record, how, want):
    """A copy of ``record`` with every ``bleu_stats`` (its own and its decodings') converted by ``how`` where its
    form is ``want`` (list: to pack; dict: to unpack)."""
    out = dict(record)
    if isinstance(out.get("bleu_stats"), want):
        out["bleu_stats"] = how(out["bleu_stats"])
    if isinstance(out.get("decoding"), dict):
        out["decoding"] = {d: dict(v, bleu_stats=how(v["bleu_stats"]))
                           if isinstance(v, dict) and isinstance(v.get("bleu_stats"), want) else v
                           for d, v in out["decoding"].items()}
    return out


def load_records(path):
    """The records of ``path`` with their statistics unpacked ([] where it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [_convert(r, unpack, dict) for r in json.load(f)]


def save_records(records, path):
    """One record per line (a new run is a one-line diff), statistics packed, written atomically."""
    lines = [json.dumps(_convert(r, pack, list), sort_keys=True) for r in records]
    with open(path + ".tmp", "w") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")
    os.replace(path + ".tmp", path)
