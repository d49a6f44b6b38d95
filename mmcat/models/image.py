"""Image encoder: a torchvision ResNet without its classifier, exposing pooled and spatial features.

``model.image.weights``: ``none`` (random init), ``imagenet`` (torchvision's weights from the torch hub cache,
downloaded into it where a network is reachable; otherwise a one-line error says where to put the file) or a path to
a state dict (a full torchvision ResNet state dict; ``fc.*`` entries and a ``module.`` / ``backbone.`` prefix are
accepted).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torchvision
from torch import nn

from mmcat.config import ResNet
from mmcat.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmcat.errors import ModelLoadError


def imagenet_weights_path(name: str) -> Tuple[str, str]:
    """(expected file in the torch hub cache, download URL) for torchvision's default ImageNet weights."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    url = weights.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)), url


def _load_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"model.image.weights: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "image_encoder.backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("fc."):
            out[k] = v
    return out


def _download(url: str, path: str, name: str) -> None:
    """Fetch torchvision's weights into the hub cache where a network is reachable; a clear error otherwise."""
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # torch.hub takes no timeout; a black-holed network must not hang every rank
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=False)
    except Exception as exc:  # no network, DNS failure, proxy: all mean "not available here"
        raise ModelLoadError(
            f"ImageNet weights for {name} are not in the torch hub cache ({path}) and could not be downloaded "
            f"({type(exc).__name__}: {exc}); download {url} to that path (or set TORCH_HOME), or set "
            f"model.image.weights=/path/to/state_dict.pth or none") from None
    finally:
        socket.setdefaulttimeout(previous)


def build_resnet(name: str, weights: str) -> nn.Module:
    name = ResNet(name).value  # a plain string from Python callers; the config already holds a ResNet
    net = torchvision.models.get_model(name, weights=None)
    net.fc = nn.Identity()
    if weights == "none":
        return net
    if weights == "imagenet":
        path, url = imagenet_weights_path(name)
        if not os.path.isfile(path):
            _download(url, path, name)
    else:
        path = weights
    missing, unexpected = net.load_state_dict(_load_state_dict(path), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net


class ImageEncoder(nn.Module):
    """Returns (pooled [B, C], spatial tokens [B, h*w, C]) for ``pixel_values``: uint8 0..255 (normalised here,
    on the device) or float, already ImageNet-normalised (see ``mmcat.data.transforms.to_pixel_values``)."""

    def __init__(self, name: str = "resnet50", weights: str = "none", channels_last: bool = True) -> None:
        super().__init__()
        self.backbone = build_resnet(name, weights)
        self.out_dim = 512 if name in ("resnet18", "resnet34") else 2048
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # not in the state dict: constants, and artifacts stay loadable across versions
        self.register_buffer("pixel_mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 pixels are ImageNet-normalised here (on the device); float pixels are taken as already normalised
        (by the loader). Either way the result has the dtype of the conv weights (fp32, or bf16 under DeepSpeed)."""
        dtype = self.backbone.conv1.weight.dtype
        if pixel_values.dtype != torch.uint8:
            return pixel_values.to(dtype)
        return (pixel_values.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = self.normalize(pixel_values)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))  # [B, C, h, w]
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return tokens.mean(1), tokens


def build_image_encoder(image_cfg) -> ImageEncoder:
    return ImageEncoder(str(image_cfg.name), str(image_cfg.weights), bool(image_cfg.channels_last))
