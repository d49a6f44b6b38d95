"""``mmcat`` command line: a thin layer that parses arguments and calls library functions.

Library modules are imported inside each command so that ``mmcat --help`` and ``mmcat pack`` stay fast
(no torch import) and a broken optional dependency only affects the command that needs it.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mmcat.config import ConfigError, TableFormat
from mmcat.errors import UserError

EXIT_USER_ERROR = 2  # a setting, path, sample or model the user can fix: one line, no traceback
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def _cmd_synth(args: argparse.Namespace) -> int:
    from mmcat.config import SynthConfig, load_config
    from mmcat.synth import synthesize

    cfg = load_config(SynthConfig, None, [f"out={args.out}"] + _flag_overrides(args, ("num_products", "num_classes", "seed", "min_side", "max_side", "format", "generator")) + (["bad_rows=true"] if args.bad_rows else [])
                      + (["attributes=false"] if args.no_attributes else []))
    synthesize(cfg)
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from mmcat.pack import pack_from_args

    return pack_from_args(args)


def _cmd_pack_merge(args: argparse.Namespace) -> int:
    from mmcat.pack.merge import merge_slices

    merge_slices(args.out)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mmcat.inspect_dataset import inspect_dataset

    return inspect_dataset(args.dir, as_json=args.json, samples=args.samples, html=args.html)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmcat.config import TrainRunConfig, load_config
    from mmcat.train import train

    cfg = load_config(TrainRunConfig, args.config, args.overrides)
    return train(cfg)


def _cmd_eval(args: argparse.Namespace) -> int:
    from mmcat.eval_artifact import evaluate_cli

    return evaluate_cli(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from mmcat.eval_artifact import calibrate_cli

    return calibrate_cli(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from mmcat.report.model import model_report

    model_report(args.out, model=args.model, data=args.data, split=args.split, run=args.run, examples=args.examples,
                 batch_size=args.batch_size, num_workers=args.num_workers)
    return 0


def _cmd_configs_list(args: argparse.Namespace) -> int:
    from mmcat.shipped import describe, shipped_files

    files = shipped_files()
    width = max(map(len, files))
    for name, path in files.items():
        print(f"{name:<{width}}  {describe(path)}".rstrip())
    return 0


def _cmd_configs_path(args: argparse.Namespace) -> int:
    from mmcat.shipped import find_shipped

    path = find_shipped(args.name)
    if path is None:
        raise ConfigError(f"no shipped config named '{args.name}' (see `mmcat configs list`)")
    print(path)
    return 0


def _cmd_configs_copy(args: argparse.Namespace) -> int:
    from mmcat.shipped import copy_shipped

    for path in copy_shipped(args.name, args.dest, force=args.force):
        print(path)
    return 0


def _at_least(low: int):
    """argparse type: an int >= ``low`` (argparse then reports a bad value in one line, exit 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a non-number: "invalid int value"
    return parse


def _probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _flag_overrides(args: argparse.Namespace, names: tuple) -> List[str]:
    return [f"{n}={getattr(args, n)}" for n in names if getattr(args, n, None) is not None]


def _add_synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic raw product dataset (table + JPEG photos)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-products", dest="num_products", type=int)
    p.add_argument("--num-classes", dest="num_classes", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-side", dest="min_side", type=int)
    p.add_argument("--max-side", dest="max_side", type=int)
    p.add_argument("--format", choices=[f.value for f in TableFormat])
    p.add_argument("--bad-rows", dest="bad_rows", action="store_true", help="plant bad inputs (for failure handling)")
    p.add_argument("--no-attributes", dest="no_attributes", action="store_true",
                   help="leave out the attribute columns (shapes: brand, colour, price; market: material, weight_g)")
    # no argparse choices: a bad value then gets the config's one-line message (exit 2) instead of usage + error
    p.add_argument("--generator", help="shapes (default; the recipes are tuned on it) or market (a second, unlike "
                   "generator, only for validating recipes)")
    p.set_defaults(func=_cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    from mmcat import __version__

    parser = argparse.ArgumentParser(prog="mmcat", description="Multimodal product classification: pack, train, use.")
    parser.add_argument("--version", action="version", version=f"mmcat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_synth_parser(sub)

    from mmcat.pack.cli_args import add_pack_arguments

    p = sub.add_parser("pack", help="raw products -> WebDataset shards with split, label map, manifest")
    add_pack_arguments(p)
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("pack-merge", help="merge the per-slice outputs of a job-array pack into one dataset")
    p.add_argument("out", help="the --out dir shared by all slices")
    p.set_defaults(func=_cmd_pack_merge)

    p = sub.add_parser("inspect", help="summarize a packed dataset")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--samples", type=int, default=3, help="sample rows to show")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page: split sizes, label counts, "
                   "failures, photos with their text per class")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("train", help="fine-tune ResNet + BERT with a fusion head (Accelerate / DeepSpeed)")
    p.add_argument("--config", help="YAML config file, or the name of a shipped one (tiny_cpu; `mmcat configs list`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 data.root=/d")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="fused / image-only / text-only metrics of a trained model")
    p.add_argument("--model", required=True, help="artifact dir (RUN_DIR/best)")
    p.add_argument("--data", required=True, help="packed dataset dir or shard pattern (like data.root)")
    p.add_argument("--split", default="test")
    p.add_argument("--label-key", dest="label_key",
                   help="cls, or json:<field> for shards written by other tools (default: the model's data.label_key)")
    p.add_argument("--out", help="write metrics JSON here (missing folders are created)")
    p.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=64)
    p.add_argument("--num-workers", dest="num_workers", type=_at_least(0), default=0)
    p.add_argument("--target-precision", dest="target_precision", type=_probability, metavar="P",
                   help="print the score threshold whose accepted predictions reach precision P on this split "
                        "(run on val; use it as predict/serve --min-score)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("calibrate", help="fit the temperatures of a trained model's scores on a split (training "
                       "does this on val when it finishes) and write best/calibration.json")
    p.add_argument("--model", required=True, help="artifact dir (RUN_DIR/best)")
    p.add_argument("--data", required=True, help="packed dataset dir or shard pattern (like data.root)")
    p.add_argument("--split", default="val")
    p.add_argument("--label-key", dest="label_key", help="cls, or json:<field> (default: the model's)")
    p.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=64)
    p.add_argument("--num-workers", dest="num_workers", type=_at_least(0), default=0)
    p.set_defaults(func=_cmd_calibrate)

    _add_report_parser(sub)
    _add_predict_parser(sub)
    _add_configs_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of a trained model on a split: metrics, "
                       "confusions with example products, modalities, calibration (and, with --run, training curves)")
    p.add_argument("--model", help="artifact dir (RUN_DIR/best); default with --run: RUN/best")
    p.add_argument("--data", help="packed dataset dir or shard pattern; default with --run: the run's data.root")
    p.add_argument("--run", help="a run directory: its best/, data and test split, plus its training curves")
    p.add_argument("--split", help="default: test (with --run: the run's data.test_split)")
    p.add_argument("--out", required=True, help="the HTML file to write (missing folders are created)")
    p.add_argument("--examples", type=_at_least(0), default=6, help="example products per confused pair (default: 6)")
    p.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=64)
    p.add_argument("--num-workers", dest="num_workers", type=_at_least(0), default=0)
    p.set_defaults(func=_cmd_report)


def _cmd_predict(args: argparse.Namespace) -> int:
    from mmcat.predict_table import predict_file

    predict_file(args.model, args.input, args.out, fmt=args.format, images_root=args.images_root, top_k=args.top_k,
                 batch_size=args.batch_size, device=args.device, min_score=args.min_score, workers=args.workers,
                 split=args.split, id_column=args.id_column, image_column=args.image_column,
                 text_columns=[c.strip() for c in args.text_columns.split(",") if c.strip()],
                 label_column=args.label_column)
    return 0


def _min_score(text: str) -> float:
    """argparse type of --min-score: a calibrated probability, 0..1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {value}")
    return value


_min_score.__name__ = "float"  # argparse names the type in its message for a non-number


def _add_predict_parser(sub) -> None:
    from mmcat.config import PackConfig

    d = PackConfig()  # the table layout of mmcat pack, with its defaults
    p = sub.add_parser("predict", help="categorise a product table or packed shards with a trained model (batch)")
    p.add_argument("input", help="product table (.csv/.tsv, .jsonl, .parquet) in the pack layout, a packed "
                   "dataset folder (with --split), or a shard pattern (/d/test/shard-{000000..000009}.tar)")
    p.add_argument("--model", required=True, help="artifact dir (RUN_DIR/best)")
    p.add_argument("--out", required=True, help="predictions: .csv, .jsonl or .parquet (missing folders are created)")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl", "parquet", "shards"],
                   help="input format (default: from the extension; a folder or pattern: shards)")
    p.add_argument("--images-root", dest="images_root", help="photo paths are relative to this (default: the "
                   "table's folder)")
    p.add_argument("--top-k", dest="top_k", type=_at_least(1), default=3, help="labels listed per row (default: 3)")
    p.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=64)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--min-score", dest="min_score", type=_min_score,
                   help="abstain (no label) below this calibrated score; prints coverage and precision")
    p.add_argument("--workers", type=_at_least(0), default=0, help="photo-decoding processes (default: 0, in-process)")
    p.add_argument("--split", default="test", help="split of a packed dataset folder (default: test)")
    p.add_argument("--id-column", dest="id_column", default=d.id_column, help=f"default: {d.id_column}")
    p.add_argument("--image-column", dest="image_column", default=d.image_column, help=f"default: {d.image_column}")
    p.add_argument("--text-columns", dest="text_columns", default=",".join(d.text_columns),
                   help=f"comma-separated (default: {','.join(d.text_columns)})")
    p.add_argument("--label-column", dest="label_column", default=d.label_column,
                   help=f"optional; when present the metrics are printed (default: {d.label_column})")
    p.set_defaults(func=_cmd_predict)


def _add_configs_parser(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped training configs and launcher files, or copy one out")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="every shipped file by name, with what it is for")
    a.set_defaults(func=_cmd_configs_list)
    a = actions.add_parser("path", help="where a shipped file is (e.g. for accelerate launch --config_file)")
    a.add_argument("name", help="e.g. tiny_cpu, launch/deepspeed_zero2, launch/deepspeed/zero2")
    a.set_defaults(func=_cmd_configs_path)
    a = actions.add_parser("copy", help="copy a shipped file out for editing (a launch YAML brings its DeepSpeed JSON)")
    a.add_argument("name", help="e.g. tiny_cpu, launch/deepspeed_zero2")
    a.add_argument("dest", help="a folder, or a file path with the same suffix")
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a.set_defaults(func=_cmd_configs_copy)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from mmcat.serve import serve
    except ImportError as exc:
        if exc.name not in ("fastapi", "uvicorn", "pydantic", "starlette"):
            raise
        raise ConfigError(f"mmcat serve needs the serve extra ({exc.name} is missing): pip install 'mmcat[serve]'") \
            from None

    serve(args.model, host=args.host, port=args.port, device=args.device, max_image_bytes=args.max_image_bytes,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k, min_score=args.min_score,
          max_request_bytes=args.max_request_bytes)
    return 0


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _size(text: str) -> int:
    """argparse type: a byte count such as 10MB, 512KiB or 1000000."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if unit not in _SIZE_UNITS or float(m.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10MB, 512KiB, 1000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _score_threshold(text: str) -> float:
    """argparse type: a score threshold in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained model over HTTP (FastAPI, micro-batched; /docs for the API)")
    p.add_argument("--model", required=True, help="artifact dir (RUN_DIR/best)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_at_least(0), default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    p.add_argument("--max-image-bytes", dest="max_image_bytes", type=_size, default="10MB",
                   help="largest photo upload, e.g. 10MB; bigger bodies are refused while they arrive (413)")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=_size, default="64MB",
                   help="largest /predict/batch body (JSON, photos base64)")
    p.add_argument("--max-batch", dest="max_batch", type=_at_least(1), default=32,
                   help="most products in one forward pass (1: micro-batching off)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=_non_negative, default=5.0,
                   help="how long a batch waits for more products after its first")
    p.add_argument("--top-k", dest="top_k", type=_at_least(1), default=3, help="labels listed per product")
    p.add_argument("--min-score", dest="min_score", type=_score_threshold,
                   help="abstain (no label) under this calibrated score; a request may set its own")
    p.set_defaults(func=_cmd_serve)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mmcat {args.command}: error: {_last_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints at the step boundary)
        print(f"mmcat {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _last_line(exc: Exception) -> str:
    """The error's own line. Raised in a DataLoader worker, the message carries the worker's traceback (torch
    re-raises the same class in the trainer with it): its last line is the error, after the class name."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    qualified = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return lines[-1][len(qualified):] if lines[-1].startswith(qualified) else lines[-1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
