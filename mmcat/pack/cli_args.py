"""``mmcat pack`` arguments (kept apart so ``mmcat --help`` builds the parser without importing OpenCV)."""
from __future__ import annotations

import argparse

from mmcat.config import InputFormat, PackConfig, ResizeMode

_D = PackConfig()  # defaults shown in --help come from the schema, the single source of truth


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="product table (.csv/.tsv, .jsonl or .parquet), or a public dataset as downloaded: "
                   "its folder or its main table (X_train.tsv, X_train_update.csv, a listings_*.json.gz, styles.csv)")
    p.add_argument("--out", required=True, help="output dataset dir")
    p.add_argument("--config", help="YAML with PackConfig keys (flags given here win)")
    p.add_argument("--format", choices=[f.value for f in InputFormat],
                   help="table format, or a public layout: rakuten (SIGIR eCom'20), rakuten-ens (ENS challenge), "
                   "abo (Amazon Berkeley Objects), fashion (Fashion Product Images). Default auto: a layout "
                   "recognised from the files present and the table's columns, else the format from the extension")
    p.add_argument("--label-field", dest="label_field",
                   help="abo/fashion: the field the label comes from (default: product_type for abo, "
                   "masterCategory for fashion)")
    p.add_argument("--language", help=f"abo: text language tag, then the same language, then any "
                   f"(default: {_D.language})")
    p.add_argument("--images-root", dest="images_root", help="image paths are relative to this (default: table's dir; "
                   "for a layout its image folder, e.g. images/image_train, images/small)")
    p.add_argument("--id-column", dest="id_column", help=f"default: {_D.id_column}")
    p.add_argument("--image-column", dest="image_column", help=f"default: {_D.image_column}")
    p.add_argument("--text-columns", dest="text_columns", help="comma-separated (default: title,description)")
    p.add_argument("--label-column", dest="label_column", help=f"default: {_D.label_column}")
    p.add_argument("--attribute-columns", dest="attribute_columns",
                   help="comma-separated product attributes (e.g. brand,colour,price) stored per sample and fit on "
                   "the train split into attributes.json (default: none)")
    p.add_argument("--numeric-attributes", dest="numeric_attributes",
                   help="attribute columns forced numeric (default: inferred from the train values)")
    p.add_argument("--categorical-attributes", dest="categorical_attributes",
                   help="attribute columns forced categorical (default: inferred from the train values)")
    p.add_argument("--attribute-min-count", dest="attribute_min_count", type=int,
                   help=f"train count a categorical value needs for its own token (default: {_D.attribute_min_count})")
    p.add_argument("--labels", help="label whitelist (JSON list or one per line): fixes the label order; "
                   "rows with other labels are rejected as label_unknown")
    p.add_argument("--splits", help="name=fraction,... (default: train=0.8,val=0.1,test=0.1)")
    p.add_argument("--seed", type=int, help=f"split/order seed (default: {_D.seed})")
    p.add_argument("--image-size", dest="image_size", type=int, help=f"default: {_D.image_size}")
    p.add_argument("--resize-mode", dest="resize_mode", choices=[m.value for m in ResizeMode],
                   help="shorter: shorter side -> size (never upscales); center_crop: square crop; "
                   "keep: no resize; border: fit in a white square (default: shorter)")
    p.add_argument("--jpeg-quality", dest="jpeg_quality", type=int, help=f"default: {_D.jpeg_quality}")
    p.add_argument("--max-samples-per-shard", dest="max_samples_per_shard", type=int,
                   help=f"default: {_D.max_samples_per_shard}")
    p.add_argument("--max-shard-bytes", dest="max_shard_bytes", type=float, help="default: 1e9")
    p.add_argument("--max-image-pixels", dest="max_image_pixels", type=int,
                   help=f"decompression-bomb guard, checked from the header (default: {_D.max_image_pixels})")
    p.add_argument("--max-image-bytes", dest="max_image_bytes", type=int,
                   help="photo files larger than this are not read, downloads stop there "
                   f"(default: {_D.max_image_bytes})")
    p.add_argument("--workers", type=int, help="processes decoding/resizing/encoding (default: 1)")
    p.add_argument("--download-timeout", dest="download_timeout", type=float,
                   help=f"image URLs: seconds one download attempt may take (default: {_D.download_timeout:g})")
    p.add_argument("--download-retries", dest="download_retries", type=int,
                   help="image URLs: retries after a timeout, a broken connection, HTTP 408/429/5xx, with "
                   f"backoff 1, 2, 4 ... s (default: {_D.download_retries})")
    p.add_argument("--download-max-per-host", dest="download_max_per_host", type=int,
                   help=f"image URLs: requests open at once to one host (default: {_D.download_max_per_host})")
    p.add_argument("--download-threads", dest="download_threads", type=int,
                   help=f"image URLs: downloads at once, ahead of processing (default: {_D.download_threads})")
    p.add_argument("--resume", action="store_true", default=None,
                   help="finish an interrupted run: completed shards are kept, the rest is redone")
    p.add_argument("--slice-index", dest="slice_index", type=int, help="job-array slice: pack rows i::n")
    p.add_argument("--num-slices", dest="num_slices", type=int, help="job-array slice count (then pack-merge)")


PACK_KEYS = ("input", "out", "format", "images_root", "id_column", "image_column", "label_column", "labels", "seed",
             "attribute_min_count", "label_field", "language",
             "image_size", "resize_mode", "jpeg_quality", "max_samples_per_shard", "max_shard_bytes",
             "max_image_pixels", "max_image_bytes", "workers", "resume", "slice_index", "num_slices",
             "download_timeout", "download_retries", "download_max_per_host", "download_threads")

LIST_KEYS = ("text_columns", "attribute_columns", "numeric_attributes", "categorical_attributes")  # comma-separated
