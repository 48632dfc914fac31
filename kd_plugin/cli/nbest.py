r"""Which of the teacher's n-best hypotheses becomes the distilled target (kd-distill-corpus ``--select``).

* ``top``: the teacher's best hypothesis (Kim & Rush's sequence-level KD);
* ``bleu`` / ``chrf``: sequence-level interpolation (Seq-Inter, Kim & Rush 2016, Sec. 3.2): the hypothesis
  closest to the reference y,  argmax_{h in n-best} sim(h, y),  with sim = sacreBLEU's sentence BLEU
  (``BLEU(effective_order=True)``) or sentence chrF, both on the text after ``--remove-bpe`` (fairseq's
  post-processing); ties go to the teacher's better-ranked hypothesis.

Selection is per sentence and deterministic, so the corpus is the same however the split is batched or
sharded.
"""
SELECT = ("top", "bleu", "chrf")


def _metric(how):
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(effective_order=True) if how == "bleu" else CHRF()


class Selector:
    """``choose(nbest, reference ids) -> index`` into the n-best (a list of (ids ending with EOS, score))."""

    def __init__(self, how, tgt_dict, remove_bpe=None):
        if how not in SELECT:
            raise ValueError("unknown selection %r" % how)
        self.how, self.tgt_dict, self.remove_bpe = how, tgt_dict, remove_bpe
        self.metric = None if how == "top" else _metric(how)

    def text(self, ids):
        import torch

        return self.tgt_dict.string(torch.as_tensor(ids), self.remove_bpe)

    def choose(self, nbest, reference):
        if self.metric is None or len(nbest) == 1:
            return 0
        ref = self.text(reference)
        scores = [self.metric.sentence_score(self.text(ids), [ref]).score for ids, _ in nbest]
        return max(range(len(scores)), key=lambda k: (scores[k], -k))
