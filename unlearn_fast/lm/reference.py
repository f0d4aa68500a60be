"""A retain-only n-gram reference for token-targeted ascent.

The tokens of a forget sample that carry memorised content are those the model predicts much better than a
reference that never saw the sample. Retraining is the reference we want to avoid; a smoothed n-gram model
counted on the retain samples is a cheap stand-in: it predicts the text shared by many samples (templates,
common words) as well as the model does, and predicts what is specific to the forget sample (a name, a
secret number, the attributes tied to that name) poorly.

Smoothing: interpolation with a Dirichlet prior, p_j(t | c_j) = (n(c_j, t) + beta * p_{j-1}(t | c_{j-1})) /
(n(c_j) + beta), from an add-one unigram up to contexts of `order - 1` tokens.
"""
import math
from collections import Counter, defaultdict

import torch


class NgramReference:
    """Counts of token n-grams (up to `order`) over the non-padding tokens of some samples."""

    def __init__(self, input_ids, labels, order=5, beta=1.0, vocab_size=None):
        if not (isinstance(order, int) and order >= 1):
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.order, self.beta = order, float(beta)
        self.vocab_size = int(vocab_size or int(input_ids.max()) + 1)
        self.counts = [defaultdict(Counter) for _ in range(order)]  # counts[j][context of j tokens][token]
        for ids, lab in zip(input_ids.tolist(), labels.tolist()):
            seq = [t for t, y in zip(ids, lab) if y != -100]
            for pos in range(1, len(seq)):
                for j in range(min(order - 1, pos) + 1):
                    self.counts[j][tuple(seq[pos - j : pos])][seq[pos]] += 1
        self.unigram_total = sum(self.counts[0][()].values())

    def logprob(self, context, token):
        p = (self.counts[0][()][token] + 1.0) / (self.unigram_total + self.vocab_size)
        for j in range(1, min(self.order - 1, len(context)) + 1):
            table = self.counts[j].get(tuple(context[len(context) - j :]))
            if table is None:
                break
            p = (table[token] + self.beta * p) / (sum(table.values()) + self.beta)
        return math.log(p)

    def _contexts(self, input_ids, labels):
        """(sample, position, context, token) for every labelled next token; context: the unpadded order - 1 before it."""
        for i, (ids, lab) in enumerate(zip(input_ids.tolist(), labels.tolist())):
            for pos in range(1, len(ids)):
                if lab[pos] == -100:
                    continue
                lo = max(0, pos - self.order + 1)
                yield i, pos, [t for t, y in zip(ids[lo:pos], lab[lo:pos]) if y != -100], ids[pos]

    def token_losses(self, input_ids, labels):
        """(n, L-1) reference loss of each next token (aligned with training.token_logprobs; 0 on padding)."""
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        for i, pos, context, token in self._contexts(input_ids, labels):
            out[i, pos - 1] = -self.logprob(context, token)
        return out

    def _unigram(self):
        counts = torch.ones(self.vocab_size)
        for token, c in self.counts[0][()].items():
            counts[token] += c
        return counts / counts.sum()

    def distributions(self, input_ids, labels):
        """(n, L-1, vocab) reference distribution of each next token given its context (0 on padding)."""
        base = self._unigram()
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, self.vocab_size)
        for i, pos, context, _ in self._contexts(input_ids, labels):
            p = base.clone()
            for j in range(1, min(self.order - 1, len(context)) + 1):
                table = self.counts[j].get(tuple(context[len(context) - j :]))
                if table is None:
                    break
                tokens = torch.tensor(list(table.keys()))
                counts = torch.tensor(list(table.values()), dtype=torch.float32)
                p = p * self.beta
                p.index_add_(0, tokens, counts)
                p /= counts.sum() + self.beta
            out[i, pos - 1] = p
        return out
