"""Speed options of the trainer (mmcat.train.speed, train.grad_checkpointing, train.compile, MFU): the choices each
device gets, and that the memory/speed options leave the numbers of a training step unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmcat.config import TrainRunConfig, load_config


def _cfg(*overrides):
    return load_config(TrainRunConfig, None, ["data.root=/d", "output_dir=/o", *overrides])


# ------------------------------------------------------------------------------------ tf32, cudnn, fused AdamW
@pytest.mark.parametrize("device, overrides, want", [
    ("cuda", [], {"tf32": True, "cudnn_benchmark": True}),  # the defaults on a GPU
    ("cuda", ["train.tf32=false", "train.cudnn_benchmark=false"], {"tf32": False, "cudnn_benchmark": False}),
    ("cpu", [], {"tf32": False, "cudnn_benchmark": False}),  # CUDA-only flags: off on CPU whatever the config
])
def test_backend_flags_by_device(device, overrides, want):
    from mmcat.train.speed import backend_flags

    assert backend_flags(device, _cfg(*overrides)) == want


def test_backend_flags_on_cpu_leave_torch_as_it_was():
    from mmcat.train.speed import apply_backend_flags

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    apply_backend_flags(torch.device("cpu"), _cfg("train.tf32=true", "train.cudnn_benchmark=true"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize("device, deepspeed, fused", [("cuda", False, True), ("cuda", True, False),
                                                       ("cpu", False, False)])
def test_fused_adamw_only_on_cuda_without_deepspeed(device, deepspeed, fused):
    from mmcat.train.optim import build_optimizer

    class Parts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def param_groups(self, lr_image, lr_text, lr_head, weight_decay):
            return [{"name": "image", "params": self.a.parameters(), "lr": lr_image},
                    {"name": "head", "params": self.b.parameters(), "lr": lr_head}]

    opt = build_optimizer(Parts(), _cfg(), device, deepspeed)
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused")) is fused
    assert [g["name"] for g in opt.param_groups] == ["image", "head"]
