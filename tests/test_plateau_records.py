"""The plateau records file keeps its per-sentence BLEU statistics packed (examples/kdexp/plateau_records.py):
packing round-trips exactly, refuses statistics it could not rebuild, and every committed record's statistics
decode to the BLEU the record states."""
import json
import random

import pytest
from kdexp import plateau, plateau_records
from sacrebleu.metrics import BLEU


def sentence_stats(rng):
    hyp, ref = rng.randint(0, 60), rng.randint(1, 60)
    tot = plateau_records.totals(hyp)
    return [hyp, ref] + [rng.randint(0, t) for t in tot] + tot


def corpus_bleu(stats):
    return BLEU()._compute_score_from_stats([sum(col) for col in zip(*stats)]).score


def test_pack_round_trips_exactly():
    rng = random.Random(0)
    stats = [sentence_stats(rng) for _ in range(500)] + [[0, 3, 0, 0, 0, 0, 0, 0, 0, 0]]
    packed = plateau_records.pack(stats)
    assert plateau_records.unpack(json.loads(json.dumps(packed))) == stats
    assert len(json.dumps(packed)) < len(json.dumps(stats)) / 2


def test_save_and_load_round_trip_every_statistics_list(tmp_path):
    rng = random.Random(1)
    records = [{"method": "plain", "seed": s, "bleu_stats": [sentence_stats(rng) for _ in range(20)],
                "decoding": {"beam5": {"bleu": 1.0}, "greedy": {"bleu": 2.0, "bleu_stats": [sentence_stats(rng)]}}}
               for s in (1, 2)] + [{"method": "teacher", "seed": 0}]
    path = str(tmp_path / "r.json")
    plateau_records.save_records(records, path)
    text = open(path).read()
    assert text.count("\n") == len(records) + 2 and "sacrebleu-stats-v1" in text  # one line per record, packed
    assert plateau_records.load_records(path) == records


@pytest.mark.parametrize("row", [[5, 5, 1, 0, 0, 0, 5, 4, 3, 1],  # total_4 of a 5-token hypothesis is 2
                                 [5, 5, 1, 0, 0, 0, 5, 4, 3]])  # a missing column
def test_pack_refuses_statistics_it_could_not_rebuild(row):
    with pytest.raises(ValueError, match="totals"):
        plateau_records.pack([row])


def test_every_committed_record_decodes_to_its_stated_bleu():
    checked = 0
    for r in plateau.load_records():
        for stats, bleu in [(r.get("bleu_stats"), r.get("test_bleu"))] + [
                (v.get("bleu_stats"), v.get("bleu")) for v in r.get("decoding", {}).values()]:
            if stats is not None:
                assert corpus_bleu(stats) == pytest.approx(bleu, abs=1e-9), (r["method"], r["seed"])
                checked += 1
    assert checked >= 60  # beam 5, greedy and sampling of every finished student run
