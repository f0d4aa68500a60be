"""A byte-level tokenizer: every UTF-8 byte is a token, plus one boundary token. No vocabulary file."""
import torch


class ByteTokenizer:
    """Token ids 0..255 are the bytes of the UTF-8 text; id 256 (`boundary_id`) marks the start and end of a
    sample and pads batches (padding is masked out of the loss with label -100)."""

    boundary_id = 256
    vocab_size = 257

    def encode(self, text):
        """text -> [boundary] + utf-8 bytes + [boundary]."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return [self.boundary_id, *text.encode("utf-8"), self.boundary_id]

    def encode_prefix(self, text):
        """Tokens of a sample's beginning (no closing boundary), e.g. the context before a secret."""
        return self.encode(text)[:-1]

    def decode(self, ids):
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def batch(self, texts, length=None):
        """Right-padded (input_ids, labels) of shape (n, length); labels are -100 on padding.

        length defaults to the longest encoded text; a text longer than `length` raises ValueError."""
        encoded = [self.encode(t) for t in texts]
        longest = max((len(e) for e in encoded), default=0)
        length = longest if length is None else length
        if longest > length:
            i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
            raise ValueError(f"texts: sample {i} has {len(encoded[i])} tokens, more than the length {length}")
        ids = torch.full((len(texts), length), self.boundary_id, dtype=torch.int64)
        labels = torch.full((len(texts), length), -100, dtype=torch.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
            labels[row, : len(e)] = torch.tensor(e)
        return ids, labels
