"""Tokenizers for unlearn_fast.lm: the byte-level ByteTokenizer (no vocabulary file), HFTokenizer (any Hugging
Face tokenizer behind the same interface) and as_tokenizer, which every uf.lm function that takes a tokenizer
applies, so a `transformers` tokenizer can be passed directly."""
import torch


def pad_batch(encoded, pad_id, length=None):
    """Right-padded (input_ids, labels) of shape (n, length) from token lists; labels are -100 on padding.

    length defaults to the longest list; a list longer than `length` raises ValueError."""
    longest = max((len(e) for e in encoded), default=0)
    length = longest if length is None else length
    if longest > length:
        i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
        raise ValueError(f"texts: sample {i} has {len(encoded[i])} tokens, more than the length {length}")
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(encoded), length), -100, dtype=torch.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.int64)
        labels[row, : len(e)] = torch.tensor(e, dtype=torch.int64)
    return ids, labels


class ByteTokenizer:
    """Token ids 0..255 are the bytes of the UTF-8 text; id 256 (`boundary_id`) marks the start and end of a
    sample and pads batches (padding is masked out of the loss with label -100)."""

    boundary_id = 256
    pad_id = 256
    vocab_size = 257

    def encode(self, text):
        """text -> [boundary] + utf-8 bytes + [boundary]."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return [self.boundary_id, *text.encode("utf-8"), self.boundary_id]

    def encode_prefix(self, text):
        """Tokens of a sample's beginning (no closing boundary), e.g. the context before a secret."""
        return self.encode(text)[:-1]

    def token_of(self, char):
        """The id of the single token a character is encoded as after a prefix (exposure scores digits)."""
        ids = self.encode_prefix(char)[1:]
        if len(ids) != 1:
            raise ValueError(f"alphabet: {char!r} is {len(ids)} bytes, not one token")
        return ids[0]

    def decode(self, ids):
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def batch(self, texts, length=None):
        """Right-padded (input_ids, labels) of shape (n, length); labels are -100 on padding.

        length defaults to the longest encoded text; a text longer than `length` raises ValueError."""
        return pad_batch([self.encode(t) for t in texts], self.pad_id, length)


class HFTokenizer:
    """A Hugging Face tokenizer (`transformers.PreTrainedTokenizerBase`: e.g. `AutoTokenizer.from_pretrained(path)`
    or a `PreTrainedTokenizerFast(tokenizer_object=...)` built in memory) with ByteTokenizer's interface.

    A sample is [bos] + tokens of the text + [eos], with the tokenizer's own bos_token / eos_token where it has them
    (GPT-2's: both '<|endoftext|>'); the text's tokens are taken with add_special_tokens=False, so a tokenizer that
    adds its own specials does not add them twice. Batches are right-padded with pad_token_id (else eos, else 0);
    padding has label -100, so it never enters a loss."""

    def __init__(self, tokenizer):
        if not callable(getattr(tokenizer, "encode", None)) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise ValueError(f"tokenizer: {type(tokenizer).__name__} is not a Hugging Face tokenizer")
        self.tokenizer = tokenizer
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.start = [int(bos)] if bos is not None else []
        self.end = [int(eos)] if eos is not None else []
        self.pad_id = int(pad if pad is not None else eos if eos is not None else 0)
        self.vocab_size = len(tokenizer)

    def _ids(self, text):
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def encode(self, text):
        return self.start + self._ids(text) + self.end

    def encode_prefix(self, text):
        return self.start + self._ids(text)

    def token_of(self, char):
        ids = self._ids(char)
        if len(ids) != 1:
            raise ValueError(f"alphabet: the tokenizer encodes {char!r} as {len(ids)} tokens {ids}, not one")
        return ids[0]

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def batch(self, texts, length=None):
        return pad_batch([self.encode(t) for t in texts], self.pad_id, length)


def as_tokenizer(tokenizer):
    """None -> ByteTokenizer(); an object with encode / encode_prefix / batch (ByteTokenizer, HFTokenizer, your own)
    as is; a Hugging Face tokenizer -> HFTokenizer(tokenizer); anything else: ValueError naming `tokenizer`."""
    if tokenizer is None:
        return ByteTokenizer()
    if all(callable(getattr(type(tokenizer), name, None)) for name in ("encode", "encode_prefix", "batch")):
        return tokenizer
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return HFTokenizer(tokenizer)
    raise ValueError(f"tokenizer: {type(tokenizer).__name__} has neither encode/encode_prefix/batch (see ByteTokenizer) "
                     "nor the Hugging Face tokenizer interface")


def train_bpe_tokenizer(texts, vocab_size=512, special="<|endoftext|>"):
    """A byte-level BPE `transformers.PreTrainedTokenizerFast` trained in memory on `texts` (no download), with
    GPT-2's conventions: one special token `special` as bos, eos and padding, byte-level pre-tokenization, and
    digits split one per token (as in LLaMA's tokenizers), so that exposure can score secrets digit by digit.
    Needs the `tokenizers` and `transformers` packages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special)
