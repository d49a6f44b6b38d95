"""Image encoder: the feature trunk of a torchvision classification model, exposing pooled and spatial features.

``model.image.name``: any model of torchvision's registry (``torchvision.models.list_models``) in one of the
FAMILIES below (ResNet, ResNeXt, Wide ResNet, ConvNeXt, EfficientNet v1/v2, RegNet, MobileNet v2/v3): the model is
built by ``torchvision.models.get_model`` and cut after its last spatial feature map by
``torchvision.models.feature_extraction.create_feature_extractor`` (the classifier head is dropped). Vision
transformers (ViT, Swin, MaxViT) are refused: they have no convolutional feature map for attention fusion.

``model.image.weights``: ``none`` (random init), ``imagenet`` (torchvision's DEFAULT weights from the torch hub
cache, downloaded into it where a network is reachable; otherwise a one-line error says where to put the file) or a
path to a state dict (a full torchvision state dict of that model; the classifier head's entries and a ``module.`` /
``backbone.`` prefix are accepted).
"""
from __future__ import annotations

import difflib
import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from mmcat.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mmcat.errors import ConfigError, ModelLoadError


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


# family -> (model-name prefixes, the node whose output is the last spatial feature map [B, C, h, w]: the input
# of the family's global average pool, as named by torchvision.models.feature_extraction.get_graph_node_names)
FAMILIES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "resnet": (("resnet",), "layer4"),
    "resnext": (("resnext",), "layer4"),
    "wide_resnet": (("wide_resnet",), "layer4"),
    "convnext": (("convnext_",), "features"),
    "efficientnet": (("efficientnet_b",), "features"),
    "efficientnet_v2": (("efficientnet_v2_",), "features"),
    "regnet": (("regnet_x_", "regnet_y_"), "trunk_output"),
    "mobilenet_v2": (("mobilenet_v2",), "features"),
    "mobilenet_v3": (("mobilenet_v3_",), "features"),
}
# token-only models: no convolutional [B, C, h, w] map to attend over (ViT's grid is fixed to its training size)
TRANSFORMERS = ("vit_", "swin_", "maxvit_")


def _family(name: str) -> Optional[str]:
    for family, (prefixes, _) in FAMILIES.items():
        if name.startswith(prefixes):
            return family
    return None


def supported_image_models() -> List[str]:
    """Every torchvision classification model ``model.image.name`` accepts, from torchvision's own registry."""
    return [n for n in torchvision.models.list_models(module=torchvision.models) if _family(n) is not None]


def image_name_error(name: str) -> Optional[str]:
    """Why ``name`` cannot be ``model.image.name`` (one line naming the key), or None when it can."""
    if name in supported_image_models():
        return None
    families = ", ".join(FAMILIES)
    key = f"config key 'model.image.name': '{name}'"
    if name.startswith(TRANSFORMERS) and name in torchvision.models.list_models(module=torchvision.models):
        return (f"{key} is a vision transformer without a convolutional feature map (not supported); "
                f"supported families: {families}")
    close = difflib.get_close_matches(name, supported_image_models(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key} is not a supported torchvision classification model{hint}; supported families: {families}"


def _trunk(name: str) -> Tuple[nn.Module, Set[str]]:
    """(torchvision's ``name`` cut after its last spatial feature map, the state-dict keys of the cut-off head).
    The trunk is an fx GraphModule (a train and an eval graph) whose parameters keep torchvision's names, so
    torchvision state dicts and older mmcat checkpoints load into it."""
    net = torchvision.models.get_model(name, weights=None)
    node = FAMILIES[_family(name)][1]
    trunk = create_feature_extractor(net, return_nodes={node: "map"})
    return trunk, set(net.state_dict()) - set(trunk.state_dict())


def build_backbone(name: str, weights: str) -> nn.Module:
    """The feature trunk of torchvision model ``name`` (see FAMILIES) with ``weights``: none | imagenet | path."""
    error = image_name_error(name)
    if error:
        raise ConfigError(error)
    trunk, head_keys = _trunk(name)
    if weights == "none":
        return trunk
    if weights == "imagenet":
        path, url = imagenet_weights_path(name)
        if not os.path.isfile(path):
            _download(url, path, name)
    else:
        path = weights
    state = {k: v for k, v in _load_state_dict(path).items() if k not in head_keys}
    try:
        missing, unexpected = trunk.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes (another model of the family)
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))  # one line
        raise ModelLoadError(f"{path} does not match {name}: {first}") from None
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return trunk


def _feature_dim(trunk: nn.Module) -> int:
    """Channels of the trunk's feature map, from one tiny forward in eval mode (no BatchNorm statistics change)."""
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        channels = int(trunk(torch.zeros(1, 3, 64, 64))["map"].shape[1])
    trunk.train(was_training)
    return channels


def _stage_of(module_path: str) -> str:
    """The stage a trunk module belongs to: ``layerN`` (ResNet family), ``features.N`` / ``trunk_output.blockN``
    (the others), or ``stem`` (what comes before)."""
    parts = module_path.split(".")
    if parts[0].startswith("layer"):
        return parts[0]
    if parts[0] in ("features", "trunk_output") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return "stem"


def split_stages(trunk: nn.Module) -> nn.Module:
    """The trunk's fx graph cut into one sub-module per stage (``submod_0`` = stem, then each stage), for
    checkpointing stage by stage. The pieces call the trunk's own conv/norm modules (the same objects, so the same
    parameters and BatchNorm buffers); functions (the residual adds) go with the stage that precedes them."""
    from torch.fx.passes.split_module import split_module

    order: Dict[str, int] = {}
    current = ["stem"]

    def partition(node) -> int:  # nodes come in graph (topological) order: stages stay contiguous
        if node.op == "call_module":
            current[0] = _stage_of(str(node.target))
        return order.setdefault(current[0], len(order))

    return split_module(trunk, trunk, partition)


@contextmanager
def _frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics untouched inside: a checkpointed stage runs its forward twice (once more in
    backward), and the recomputation must not move the running mean/variance a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class _Checkpointed(nn.Module):
    """Runs ``stage`` under non-reentrant activation checkpointing: only its input is kept for backward, its
    activations are recomputed (BatchNorm statistics frozen during the recomputation)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args):
        from contextlib import nullcontext
        from torch.utils.checkpoint import checkpoint

        if torch.compiler.is_compiling():
            # dynamo takes no context_fn; AOTAutograd functionalises the BatchNorm buffer update, which then
            # happens once in the compiled forward, not again in the recomputation
            return checkpoint(self.stage, *args, use_reentrant=False)
        return checkpoint(self.stage, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _frozen_norm_statistics(self.stage)))


class ImageEncoder(nn.Module):
    """Returns (pooled [B, C], spatial tokens [B, h*w, C]) for ``pixel_values``: uint8 0..255 (normalised here,
    on the device) or float, already ImageNet-normalised (see ``mmcat.data.transforms.to_pixel_values``).
    ``C`` = ``out_dim``, the channels of the backbone's last feature map; pooled = the mean over the map (the global
    average pool torchvision's classifiers start with)."""

    def __init__(self, name: str = "resnet50", weights: str = "none", channels_last: bool = True) -> None:
        super().__init__()
        self.backbone = build_backbone(str(name), str(weights))
        self.out_dim = _feature_dim(self.backbone)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # not in the state dict: constants, and artifacts stay loadable across versions
        self.register_buffer("pixel_mean", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint the backbone stage by stage in training (train.grad_checkpointing): activation memory of one
        stage instead of all, for one extra forward of the backbone. The split trunk is built here, once, outside
        any torch.compile trace (built inside one, it would be a new class at every call: a recompile per step);
        it is kept out of the module tree (in ``__dict__``) so the state dict, ``.to()`` and optimizers see only
        the trunk, whose modules it shares."""
        self.grad_checkpointing = enabled
        self.__dict__.pop("_stages", None)
        if enabled:
            stages = split_stages(self.backbone)
            for name, child in list(stages.named_children()):
                if name != "submod_0":  # the stem's activations are small; checkpoint the stages
                    setattr(stages, name, _Checkpointed(child))
            self.__dict__["_stages"] = stages

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 pixels are ImageNet-normalised here (on the device); float pixels are taken as already normalised
        (by the loader). Either way the result has the dtype of the weights (fp32, or bf16 under DeepSpeed)."""
        dtype = next(self.backbone.parameters()).dtype
        if pixel_values.dtype != torch.uint8:
            return pixel_values.to(dtype)
        return (pixel_values.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(pixel_values)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = (self.__dict__["_stages"] if checkpointed else self.backbone)(x)["map"]  # [B, C, h, w]
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return tokens.mean(1), tokens


def build_image_encoder(image_cfg) -> ImageEncoder:
    return ImageEncoder(str(image_cfg.name), str(image_cfg.weights), bool(image_cfg.channels_last))
