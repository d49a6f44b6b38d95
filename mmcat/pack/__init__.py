"""Packing: a product table + photos -> WebDataset shards with a stratified split, label map and manifest.

``pack(cfg)`` is the library entry point (``cfg``: a ``PackConfig``); ``pack_from_args`` backs ``mmcat pack``.
"""
from __future__ import annotations

import argparse
import sys

from omegaconf.errors import OmegaConfBaseException

from mmcat.config import PackConfig, load_config
from mmcat.errors import ConfigError


def pack(cfg) -> dict:
    from mmcat.pack.packer import pack as _pack

    return _pack(cfg)


def config_from_args(args: argparse.Namespace) -> PackConfig:
    from mmcat.pack.cli_args import PACK_KEYS
    from mmcat.pack.split import parse_splits

    cfg = load_config(PackConfig, getattr(args, "config", None), require_complete=False)
    try:  # attribute assignment (not dotlist strings): paths with '=', ':' or spaces stay intact
        for key in PACK_KEYS:
            value = getattr(args, key, None)
            if value is not None:
                setattr(cfg, key, value)
        if getattr(args, "text_columns", None):
            cfg.text_columns = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        if getattr(args, "splits", None):
            cfg.splits = parse_splits(args.splits)  # replaces (a merge would keep unlisted default splits)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config key '{getattr(exc, 'full_key', '?')}': {str(exc).splitlines()[0]}") from None
    return cfg  # type: ignore[return-value]


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
