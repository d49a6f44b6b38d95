"""Packing: a product table + photos -> WebDataset shards with a stratified split, label map and manifest.

``pack(cfg)`` is the library entry point (``cfg``: a ``PackConfig``); ``pack_from_args`` backs ``mmcat pack``.
"""
from __future__ import annotations

import argparse
import sys

from mmcat.config import PackConfig, load_config


def pack(cfg) -> dict:
    from mmcat.pack.packer import pack as _pack

    return _pack(cfg)


def config_from_args(args: argparse.Namespace) -> PackConfig:
    from mmcat.pack.cli_args import LIST_KEYS, PACK_KEYS
    from mmcat.pack.split import parse_splits

    # values, not dotlist strings: paths with '=', ':' or spaces stay intact; --splits replaces the default dict
    values = {key: getattr(args, key) for key in PACK_KEYS if getattr(args, key, None) is not None}
    for key in LIST_KEYS:
        if getattr(args, key, None):
            values[key] = [c.strip() for c in getattr(args, key).split(",") if c.strip()]
    if getattr(args, "splits", None):
        values["splits"] = parse_splits(args.splits)
    return load_config(PackConfig, getattr(args, "config", None), require_complete=False, values=values)


def pack_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = pack(cfg)
    splits = ", ".join(f"{name} {info['samples']}" for name, info in manifest["splits"].items())
    fails = manifest["failures"]
    where = f"{cfg.out}/slices/slice-{cfg.slice_index:03d}" if cfg.num_slices > 1 else cfg.out
    print(f"packed {manifest['total_samples']} samples ({splits}) into {cfg.out}; "
          f"{fails['rejected']} rejected, {fails['degraded']} degraded (see {where}/failures.jsonl)")
    print_warnings("pack", manifest["warnings"])
    return 0


def print_warnings(command: str, warnings) -> None:
    for warning in warnings:
        print(f"mmcat {command}: warning: {warning}", file=sys.stderr)


__all__ = ["pack", "pack_from_args", "config_from_args", "print_warnings"]
