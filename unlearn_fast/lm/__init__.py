"""Language-model unlearning: byte tokenizer, canary corpus, tiny GPT-2 training, per-sample first-epoch
gradient history, calibrated gradient ascent (uf.unlearn methods "first_epoch_ascent", "gradient_ascent")
and metrics (exposure, MIA AUC, influence). transformers is needed only to build/train GPT-2 models."""
from .ascent import RECOMMENDED
from .corpus import Canary, Corpus, make_corpus
from .recording import FirstEpochHistory, FirstEpochRecorder, per_sample_gradients, select_params
from .tokenizer import ByteTokenizer, HFTokenizer, as_tokenizer, train_bpe_tokenizer
from .training import TextDataset, build_gpt2, epoch_batches, lm_loss, sample_losses, train_lm
