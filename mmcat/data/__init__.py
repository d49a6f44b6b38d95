"""Data pipeline: packed WebDataset shards -> batches for the model.

Public API: ``build_train_loader(cfg, tokenizer, rank, world_size, epoch, skip_batches=0) -> LoaderInfo`` (every
train sample once per epoch plus the documented padding; see ``loader`` for the train-stream rules) and
``build_eval_loader(data_cfg, split, tokenizer, batch_size, num_workers, rank=0, world_size=1)``;
``PersistentTrainLoader`` (build_train_loader's batches through workers that live for the whole run) and
``close_loader`` (stops a persistent loader's workers).
"""
from mmcat.data.loader import (LoaderInfo, PersistentTrainLoader, build_eval_loader, build_train_loader, close_loader,
                               iterate_batches)
from mmcat.data.shards import label_counts, read_labels, split_sizes, train_shard_sizes
from mmcat.errors import BadSampleError, DataError

__all__ = ["LoaderInfo", "PersistentTrainLoader", "close_loader", "iterate_batches", "build_train_loader",
           "build_eval_loader", "read_labels", "split_sizes", "label_counts", "train_shard_sizes", "DataError", "BadSampleError"]
