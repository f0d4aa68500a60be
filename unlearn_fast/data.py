"""Indices without glue: a data set wrapper whose samples carry their own index, so that any sampler
(DataLoader(shuffle=True), a custom Sampler, DistributedSampler) delivers the indices HistoryRecorder.record
needs together with the batch.

    loader = DataLoader(uf.IndexedDataset(train_set), batch_size=64, shuffle=True)
    for batch in loader:
        indices, x, y = uf.split_batch(batch)
        ...; rec.record(indices, batch_size=len(x))
"""
import torch


class IndexedDataset(torch.utils.data.Dataset):
    """Map-style data set whose item i is (i, *dataset[i]) (a tuple or list sample is spread: (i, x, y)), or
    (i, sample) for any other sample. The indices are positions in `dataset`: pass `dataset` itself as the
    train_set of finish() and uf.unlearn."""

    def __init__(self, dataset):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ValueError(f"dataset: must be a map-style data set (__getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        return (int(i), *sample) if isinstance(sample, (tuple, list)) else (int(i), sample)


def split_batch(batch):
    """(indices, inputs, targets) of a collated IndexedDataset batch of (x, y) samples."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        size = len(batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ValueError(f"batch: expected a collated IndexedDataset batch of (index, input, target) samples, got {size} fields")
    indices, inputs, targets = batch
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise ValueError("batch: its first field must be the int64 indices IndexedDataset adds; wrap the data set in uf.IndexedDataset")
    return indices, inputs, targets
