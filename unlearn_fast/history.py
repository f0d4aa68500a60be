"""Gradient history: what is recorded while training, how it is stored, and how it is loaded back."""
import dataclasses

CODECS = ("fp32", "bf16", "int8", "int4")
KINDS = ("full", "minimal", "first_epoch", "all_epochs")


@dataclasses.dataclass(frozen=True)
class HistoryPolicy:
    """What HistoryRecorder keeps.

    kind:
      "full"        every iteration's parameters and batch gradient (what retrain and deltagrad need)
      "minimal"     what Mini-Unlearning needs (see docs/mini_unlearning.md)
      "first_epoch" per-sample gradients of `params` during the first epoch (language-model ascent)
      "all_epochs"  the same for every epoch (the multi-epoch baseline)
    codec: storage of the recorded float vectors: fp32, bf16, int8 or int4 (blockwise, ops.quantize_blockwise).
    params: which parameters the per-sample kinds record: a preset ("embeddings", "last_blocks:N",
      "all") or a list of name patterns (fnmatch).
    """

    kind: str = "full"
    codec: str = "fp32"
    blocksize: int = 256
    params: object = "all"
    per_sample: bool = False
    activations: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"HistoryPolicy: kind must be one of {KINDS}, got {self.kind!r}")
        if self.codec not in CODECS:
            raise ValueError(f"HistoryPolicy: codec must be one of {CODECS}, got {self.codec!r}")
