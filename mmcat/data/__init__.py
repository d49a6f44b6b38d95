"""Data pipeline: packed WebDataset shards -> batches for the model (see ``loader`` for the train-stream rules)."""
from mmcat.data.loader import LoaderInfo, build_eval_loader, build_train_loader, iterate_batches
from mmcat.data.samples import BadSampleError
from mmcat.data.sources import DataError, label_counts, read_labels, split_sizes, train_shard_sizes

__all__ = ["LoaderInfo", "iterate_batches", "build_train_loader", "build_eval_loader", "read_labels", "split_sizes", "label_counts",
           "DataError", "BadSampleError", "train_shard_sizes"]
