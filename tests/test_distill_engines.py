"""examples/distill_engines.py's report (kdexp/distill.py): the speed ratios, agreement shares and block it
writes, from records."""
from kdexp import distill as distill_engines


def records():
    speed = [{"engine": e, "threads": t, "sentences": 400, "sentences_per_s": r}
             for (e, t, r) in (("fairseq", 1, 20.0), ("fairseq", 2, 30.0), ("ctranslate2 float32", 1, 70.0),
                               ("ctranslate2 float32", 2, 75.0))]
    corpora = [{"corpus": c, "shards": 2, "wall_seconds": w, "train_sentences": 200, "identical_to_fairseq": n}
               for c, w, n in (("fairseq", 90.0, 200), ("ct2", 30.0, 199))]
    return {"command": "examples/distill_engines.py", "machine": "test", "throughput": speed, "corpora": corpora,
            "students": []}


def test_report_ratios_and_agreement(tmp_path):
    text = distill_engines.report(records(), [1], 2, refs=None)
    assert "| ctranslate2 float32 | 1 | 70.0 | 3.50x |" in text
    assert "| ctranslate2 float32 | 2 | 75.0 | 2.50x |" in text
    assert "| ct2 | 30 | 199 / 200 (99.5%) |" in text
    doc = tmp_path / "DISTILL.md"
    doc.write_text("head\n%s\nold\n%s\ntail\n" % (distill_engines.BEGIN, distill_engines.END))
    distill_engines.write_block(str(doc), text)
    assert doc.read_text() == "head\n%s\n%s\n%s\ntail\n" % (distill_engines.BEGIN, text, distill_engines.END)
