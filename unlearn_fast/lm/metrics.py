"""Language-model unlearning metrics: losses and perplexity, canary exposure, membership-inference AUC
(LOSS, zlib ratio, Min-K% probability), Hessian (inverse-HVP) influence and gradient / activation dot-product
influence scores."""
import copy
import math
import warnings
import zlib

import torch

from ..metrics import auc

from .tokenizer import as_tokenizer
from .training import check_fits, eval_mode, forward_logits, token_logprobs


@torch.no_grad()
def token_stats(model, dataset, batch_size=64):
    """(per-sample mean token loss (n,), per-token log-probs (n, L-1), mask (n, L-1)) of a TextDataset."""
    check_fits(model, dataset.input_ids)
    logps, masks = [], []
    with eval_mode(model):
        for start in range(0, dataset.input_ids.shape[0], batch_size):
            ids = dataset.input_ids[start : start + batch_size]
            labels = dataset.labels[start : start + batch_size]
            logp, mask = token_logprobs(forward_logits(model, ids), labels)
            logps.append(logp)
            masks.append(mask)
    logp, mask = torch.cat(logps), torch.cat(masks)
    return -logp.sum(1) / mask.sum(1).clamp(min=1), logp, mask


def losses(model, dataset, batch_size=64):
    """Per-sample mean next-token loss (n,)."""
    return token_stats(model, dataset, batch_size)[0]


def perplexity(model, dataset, batch_size=64):
    """exp(token-weighted mean loss) over the whole data set."""
    _, logp, mask = token_stats(model, dataset, batch_size)
    return math.exp(float(-logp.sum() / mask.sum()))


# ----------------------------------------------------------------------------- exposure
@torch.no_grad()
def secret_logprobs(model, prefix, n_digits, tokenizer=None, alphabet="0123456789", batch_size=1024):
    """log p(secret | prefix) for every secret in alphabet**n_digits, as a flat tensor in lexicographic
    order of the secrets (index = the secret read as a base-len(alphabet) number).

    One forward pass over prefix + s[:-1] for each of the len(alphabet)**(n_digits-1) shorter strings gives
    every digit's conditional log-probability, so all candidates cost len(alphabet) times fewer sequences.

    That needs a tokenizer that encodes the prefix followed by the digits as the prefix's tokens then one token per
    digit (the byte tokenizer, uf.lm.train_bpe_tokenizer). With another one (GPT-2's BPE merges digits and the space
    before them) each candidate is scored by its own tokenization instead: the log-probability of the tokens of
    prefix + s after the tokens all candidates share, one sequence per candidate (len(alphabet) times the work); the
    values then differ from the digit-wise ones by a constant, the log-probability of the prefix's last tokens,
    which the ranking (exposure) does not depend on."""
    tokenizer = as_tokenizer(tokenizer)
    base = len(alphabet)
    try:
        digit_ids = torch.tensor(_digit_tokens(tokenizer, prefix, alphabet, n_digits))
    except _NotDigitwise:
        return _candidate_logprobs(model, tokenizer, prefix, n_digits, alphabet, batch_size)
    prefix_ids = torch.tensor(tokenizer.encode_prefix(prefix))
    n_prefixes = base ** (n_digits - 1)
    check_fits(model, torch.empty(1, len(prefix_ids) + n_digits - 1))
    # digits of every (n_digits - 1)-long string, most significant first
    code = torch.arange(n_prefixes)
    digits = torch.stack([(code // base**k) % base for k in reversed(range(n_digits - 1))], dim=1) if n_digits > 1 else code[:, None][:, :0]
    totals = []
    with eval_mode(model):
        for start in range(0, n_prefixes, batch_size):
            d = digits[start : start + batch_size]
            logp = _digit_logprobs(model, prefix_ids, digit_ids[d])[..., digit_ids]
            # logp[:, k, a]: log p(digit k = alphabet[a] | prefix, digits < k)
            known = logp[:, :-1].gather(-1, d.unsqueeze(-1)).squeeze(-1).sum(1) if n_digits > 1 else torch.zeros(d.shape[0])
            totals.append(known[:, None] + logp[:, -1])  # (batch, base): every choice of the last digit
    return torch.cat(totals).reshape(-1)


class _NotDigitwise(ValueError):
    pass


def _candidate_logprobs(model, tokenizer, prefix, n_digits, alphabet, batch_size):
    """Every candidate secret scored by its own tokenization (see secret_logprobs)."""
    base = len(alphabet)
    candidates = ["".join(alphabet[(k // base ** j) % base] for j in reversed(range(n_digits))) for k in range(base ** n_digits)]
    sequences = [tokenizer.encode_prefix(prefix + c) for c in candidates]
    head = tokenizer.encode_prefix(prefix)
    shared = len(head)
    for seq in sequences:  # the longest run of leading tokens every candidate's tokenization shares with the prefix's
        k = 0
        while k < min(shared, len(seq)) and seq[k] == head[k]:
            k += 1
        shared = k
    if shared == 0:
        raise ValueError("tokenizer: the candidates' tokenizations share no leading token (no bos token?); exposure needs a "
                         "common context to score them from")
    context = torch.tensor(head[:shared])
    check_fits(model, torch.empty(1, max(len(seq) for seq in sequences) - 1))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 50_000
    scores = torch.empty(len(candidates))
    by_length = {}
    for k, seq in enumerate(sequences):
        by_length.setdefault(len(seq) - shared, []).append(k)
    with eval_mode(model):
        for length, members in by_length.items():
            tails = torch.tensor([sequences[k][shared:] for k in members])  # (m, length) tokens after the shared context
            chunk = max(1, min(batch_size, (1 << 26) // (length * vocab)))  # log-softmax rows of at most 256 MiB
            for start in range(0, len(members), chunk):
                part = tails[start : start + chunk]
                logp = _digit_logprobs(model, context, part[:, :-1])  # (m, length, vocab): after context, after each tail token
                scores[members[start : start + chunk]] = logp.gather(-1, part.unsqueeze(-1)).squeeze(-1).sum(1)
    return scores


def _digit_tokens(tokenizer, prefix, alphabet, n_digits):
    """The token of each character of alphabet, after checking that the tokenizer encodes prefix + any two of them
    as the prefix's tokens followed by one token per character: the scores follow that path, and with a tokenizer
    that merges digits (a BPE with tokens such as '48') they would not be the candidates' probabilities."""
    token_of = getattr(tokenizer, "token_of", None)
    try:
        ids = [token_of(a) if token_of else tokenizer.encode_prefix(a)[-1] for a in alphabet]
    except ValueError as err:  # a character that is several tokens
        raise _NotDigitwise(str(err)) from None
    head = tokenizer.encode_prefix(prefix)
    pairs = [(a, b) for a in range(len(alphabet)) for b in range(len(alphabet))] if n_digits > 1 else [(a, None) for a in range(len(alphabet))]
    for a, b in pairs:
        text = alphabet[a] + (alphabet[b] if b is not None else "")
        want = head + [ids[a]] + ([ids[b]] if b is not None else [])
        got = tokenizer.encode_prefix(prefix + text)
        if got != want:
            raise _NotDigitwise(
                f"tokenizer: the prefix ...{prefix[-24:]!r} followed by {text!r} is encoded as ...{got[max(0, len(head) - 2):]}, not the "
                f"prefix's tokens then one token per character (...{want[max(0, len(head) - 2):]}); exposure scores the secret one "
                "character per token. Use a tokenizer that splits digits, e.g. tokenizers.pre_tokenizers.Digits(individual_digits=True)"
            )
    return ids


def _digit_logprobs(model, prefix_ids, continuations):
    """(n, k+1, vocab) log-probs of the next token after prefix and after each of the k continuation tokens.

    Runs the shared prefix once and reuses its key/value cache for every continuation; models whose cache
    does not support batch expansion fall back to full sequences (same numbers, more work)."""
    n = continuations.shape[0]
    try:
        with warnings.catch_warnings():  # newer transformers rename past_key_values; older ones need it
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=prefix_ids[None], use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            first = out.logits[:, -1:].expand(n, -1, -1)
            rest = model(input_ids=continuations, past_key_values=cache, use_cache=True).logits if continuations.shape[1] else first[:, :0]
        logits = torch.cat([first, rest], dim=1)
    except (AttributeError, TypeError, NotImplementedError):
        ids = torch.cat([prefix_ids.expand(n, -1), continuations], dim=1)
        logits = model(input_ids=ids, use_cache=False).logits[:, len(prefix_ids) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def exposure(model, prefix, secret, tokenizer=None, alphabet="0123456789", batch_size=1024):
    """Carlini et al. 2019 exposure in bits: log2(#candidates) - log2(rank of the true secret), candidates
    ranked by model log-likelihood (rank 1 = most likely; ties count in the secret's favour)."""
    if not secret or any(ch not in alphabet for ch in secret):
        raise ValueError(f"secret: must be a non-empty string over {alphabet!r}, got {secret!r}")
    scores = secret_logprobs(model, prefix, len(secret), tokenizer, alphabet, batch_size)
    true_index = 0
    for ch in secret:
        true_index = true_index * len(alphabet) + alphabet.index(ch)
    rank = 1 + int((scores > scores[true_index]).sum())
    return math.log2(scores.numel()) - math.log2(rank)


def mean_exposure(model, canaries, tokenizer=None):
    return sum(exposure(model, c.prefix, c.secret, tokenizer) for c in canaries) / max(len(canaries), 1)


# ----------------------------------------------------------------------------- membership inference
def min_k_count(n_tokens, min_k):
    """k = max(1, int(min_k * n)) per sample, from a tensor of token counts."""
    return torch.tensor([max(1, int(min_k * int(n))) for n in n_tokens], dtype=torch.int64)


def min_k_select(logp, mask, min_k):
    """(n, L-1) float mask of each sample's min_k fraction of lowest token log-probabilities (ties by position)."""
    k = min_k_count(mask.sum(1), min_k)
    order = logp.detach().masked_fill(~mask, float("inf")).argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return (ranks < k[:, None]).float(), k


def min_k_losses(logp, mask, min_k):
    """Per-sample Min-K% loss (n,): minus the mean of the min_k fraction of lowest token log-probabilities."""
    select, k = min_k_select(logp, mask, min_k)
    return -(logp * select).sum(1) / k


def mia_scores(model, dataset, min_k=0.2):
    """Membership scores (higher = more likely a training member) of each sample under three attacks:
    loss: -mean token loss; zlib: -(total log-loss in nats) / (zlib-compressed byte length of the text);
    min_k: mean of the lowest min_k fraction of token log-probs (Shi et al. 2023, Min-K% Prob)."""
    if not 0 < min_k <= 1:
        raise ValueError(f"min_k must be in (0, 1], got {min_k}")
    loss, logp, mask = token_stats(model, dataset)
    zlib_len = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in dataset.texts], dtype=torch.float32)
    total = -logp.sum(1)
    return {"loss": -loss, "zlib": -total / zlib_len, "min_k": -min_k_losses(logp, mask, min_k)}


def mia_auc(model, members, nonmembers, min_k=0.2):
    """{attack: AUC} separating `members` (e.g. the forget set) from `nonmembers` (held-out samples)."""
    a, b = mia_scores(model, members, min_k), mia_scores(model, nonmembers, min_k)
    return {k: auc(torch.as_tensor(a[k], dtype=torch.float64), torch.as_tensor(b[k], dtype=torch.float64)) for k in a}


# ----------------------------------------------------------------------------- influence scores
def gradient_influence(model, dataset, indices, probe, params="embeddings"):
    """Dot product of each sample's loss gradient with the probe set's mean loss gradient (the first-order
    change in the probe loss when that sample takes a gradient step): TracIn-style at one checkpoint.
    Returns a tensor (len(indices),)."""
    from .recording import per_sample_gradients, select_params

    names = select_params(model, params)
    idx = torch.as_tensor(indices, dtype=torch.int64)
    g = per_sample_gradients(model, names, dataset.input_ids[idx], dataset.labels[idx])
    g_probe = per_sample_gradients(model, names, probe.input_ids, probe.labels).mean(0)
    return g @ g_probe


class _Logits(torch.nn.Module):
    """model(input_ids) -> logits: the plain tensor output the HVP machinery differentiates."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def hvp_influence(model, dataset, indices, probe, params="embeddings", hessian_set=None, damping=1e-3, kind="ggn",
                  tol=1e-5, max_iter=500):
    """Koh & Liang influence of each sample on the probe set's loss (the mean of its samples' losses), in the
    parameters `params`:
    I_i = -g_probe' (H + damping I)^-1 g_i, with H the curvature of the mean loss over `hessian_set` (default the
    probe) by batched Hessian-vector products and conjugate gradients (unlearn_fast.ihvp): kind="ggn", the
    Gauss-Newton matrix (positive semi-definite for any network, so CG applies), or "hessian". Negative: up-weighting
    the sample lowers the probe loss. One solve for all samples. Returns ((len(indices),) float32, the solve report);
    raises ConvergenceError if CG does not converge. The model is not changed."""
    from ..hvp import ihvp
    from .recording import per_sample_gradients, select_params
    from .training import eager_attention, lm_loss

    names = select_params(model, params)
    idx = torch.as_tensor(indices, dtype=torch.int64)
    g = per_sample_gradients(model, names, dataset.input_ids[idx], dataset.labels[idx])
    g_probe = per_sample_gradients(model, names, probe.input_ids, probe.labels).mean(0)
    wrapped = _Logits(copy.deepcopy(model)).eval()  # only `names` are differentiated (model order, as g); no dropout
    for name, p in wrapped.model.named_parameters():
        p.requires_grad_(name in names)
    batch = hessian_set if hessian_set is not None else probe
    check_fits(model, batch.input_ids)
    with eager_attention(wrapped.model):
        solved, report = ihvp(lm_loss, wrapped, g_probe[None], (batch.input_ids, batch.labels),
                              damping=damping, kind=kind, tol=tol, max_iter=max_iter)
    return -(g @ solved[0]), report


def activation_similarity(model, dataset, indices, probe):
    """Cosine similarity of each sample's mean final hidden state with the probe set's mean."""
    from .recording import mean_final_hidden

    idx = torch.as_tensor(indices, dtype=torch.int64)
    a = mean_final_hidden(model, dataset.input_ids[idx], dataset.labels[idx])
    b = mean_final_hidden(model, probe.input_ids, probe.labels).mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(a, b)
