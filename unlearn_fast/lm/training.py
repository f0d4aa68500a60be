"""Tiny GPT-2 models built from a config, a text data set, the language-model loss, and a training loop
(used for the original model, for retraining without the forget samples, and for recording history)."""
import contextlib
import math
import time

import torch
import torch.nn.functional as F

from .tokenizer import ByteTokenizer, as_tokenizer


def build_gpt2(n_layer=2, n_embd=64, n_head=4, n_positions=192, vocab_size=ByteTokenizer.vocab_size, seed=0):
    """A GPT2LMHeadModel trained from scratch: no dropout (per-sample gradients and retraining stay
    deterministic) and eager attention (torch.func.vmap has no batching rule for the fused CPU SDPA kernel)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=ByteTokenizer.boundary_id, eos_token_id=ByteTokenizer.boundary_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    set_eager_attention(model)
    return model


def set_eager_attention(model):
    """Switch a Hugging Face model to eager attention where it supports switching; returns the old setting."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if old not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return old


@contextlib.contextmanager
def eager_attention(model):
    old = set_eager_attention(model)
    try:
        yield
    finally:
        if old not in (None, "eager"):
            model.set_attn_implementation(old)


def context_length(model):
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


OVERFLOW = ("error", "truncate")


class TextDataset(torch.utils.data.Dataset):
    """Map-style data set of texts: item i is (input_ids, labels), right-padded to a common length.

    tokenizer: None (ByteTokenizer), a Hugging Face tokenizer (wrapped in HFTokenizer) or any object with
    encode / encode_prefix / batch. `texts` stay available for fuzzy matching.
    context: the model's context length (an int, or the model itself: its config's n_positions /
    max_position_embeddings). A sample with more tokens than that is handled by `overflow`:
      "error" (default): ValueError naming the sample, its length, the context and this argument;
      "truncate": keep its first `context` tokens (what follows is neither trained on, measured nor forgotten;
      for the corpus's biographies that is the secret at their end); `truncated` lists the samples cut.
    Without context nothing is checked here; the functions that run the model refuse too-long inputs."""

    def __init__(self, texts, tokenizer=None, context=None, overflow="error"):
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
        self.texts = list(texts)
        self.tokenizer = as_tokenizer(tokenizer)
        if context is not None and not isinstance(context, int):
            model, context = context, context_length(context)
            if context is None:
                raise ValueError(f"context: {type(model).__name__} declares no context length (config n_positions or "
                                 "max_position_embeddings); pass an int")
        self.context, self.overflow = context, overflow
        encoded = [self.tokenizer.encode(t) for t in self.texts]
        lengths = [len(e) for e in encoded]
        self.truncated = []
        if context is not None and lengths and max(lengths) > context:
            long = [i for i, n in enumerate(lengths) if n > context]
            if overflow == "error":
                i = max(long, key=lengths.__getitem__)
                raise ValueError(
                    f"texts: {len(long)} samples are longer than the model context of {context} tokens (sample {i}: "
                    f"{lengths[i]} tokens); shorten or split them, or pass overflow='truncate' to keep their first "
                    f"{context} tokens"
                )
            self.truncated = long
            encoded = [e[:context] for e in encoded]
        self.input_ids, self.labels = _pad(self.tokenizer, encoded)

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i]

    def subset(self, indices):
        return TextDataset([self.texts[int(i)] for i in indices], self.tokenizer, self.context, self.overflow)


def _pad(tokenizer, encoded):
    from .tokenizer import pad_batch

    pad_id = getattr(tokenizer, "pad_id", getattr(tokenizer, "boundary_id", 0))
    return pad_batch(encoded, pad_id, max((len(e) for e in encoded), default=1) or 1)


def lm_loss(logits, labels):
    """Mean next-token cross entropy over all non-padding tokens of the batch (the training loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def token_logprobs(logits, labels):
    """(log p(next token), mask) of shape (n, L-1); mask is False on padding."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sample_losses(logits, labels):
    """Per-sample mean next-token cross entropy, shape (n,)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(1) / mask.sum(1).clamp(min=1)


def forward_logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits


def check_fits(model, input_ids):
    """ValueError unless input_ids fit the model: no longer than its context, token ids inside its vocabulary."""
    limit = context_length(model)
    if limit is not None and input_ids.shape[-1] > limit:
        raise ValueError(f"input_ids: sequences of {input_ids.shape[-1]} tokens are longer than the model context of {limit}; "
                         f"build the data set with TextDataset(texts, tokenizer, context=model) to find the long samples, and "
                         f"overflow='truncate' to cut them to {limit} tokens")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and input_ids.numel() and not input_ids.dtype.is_floating_point:
        top = int(input_ids.max())
        if top >= vocab:
            raise ValueError(f"input_ids: token id {top} is outside the model's vocabulary of {vocab} (config vocab_size): "
                             "the data set was tokenized with another tokenizer than the model's")


@contextlib.contextmanager
def eval_mode(model):
    """Every module in eval mode (no dropout) inside the block; each module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def epoch_batches(n, epoch, batch_size, seed, exclude=()):
    """The batches of one epoch: a permutation from (seed, epoch) minus `exclude`, cut into batches.

    Retraining with exclude=forget keeps every other sample in the same order as the original run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if len(exclude):
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.as_tensor(list(exclude), dtype=torch.int64)] = False
        order = order[keep[order]]
    return list(order.split(batch_size))


def train_lm(model, dataset, epochs=20, batch_size=16, lr=3e-3, seed=0, exclude=(), recorders=(), progress=False, warmup_steps=30):
    """Adam training of a causal LM on a TextDataset (linear learning-rate warm-up over warmup_steps, then
    cosine decay to zero); recorders get record() after each backward and end_epoch() after each epoch.
    Returns {"seconds", "epoch_losses"}. `exclude` drops samples (retrain on the same batch order)."""
    from tqdm.auto import tqdm

    check_fits(model, dataset.input_ids)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = epochs * len(epoch_batches(len(dataset), 0, batch_size, seed, exclude))

    def lr_factor(step):  # linear warm-up, then cosine decay to 0: runs end converged, so retrain compares
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    recorders = [r(model, optimizer) if callable(r) and not hasattr(r, "record") else r for r in recorders]
    start = time.perf_counter()
    epoch_losses = []
    bar = tqdm(range(epochs), desc="train", disable=not progress, leave=False)
    for epoch in bar:
        total, count = 0.0, 0
        for batch in epoch_batches(len(dataset), epoch, batch_size, seed, exclude):
            input_ids, labels = dataset.input_ids[batch], dataset.labels[batch]
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(forward_logits(model, input_ids), labels)
            loss.backward()
            for recorder in recorders:
                recorder.record(batch, input_ids, labels)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        for recorder in recorders:
            recorder.end_epoch()
        epoch_losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    model.eval()
    return {"seconds": time.perf_counter() - start, "epoch_losses": epoch_losses}
