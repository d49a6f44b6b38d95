"""The Python API of a trained model, and the one preprocessing + forward path that ``mmcat predict``, ``mmcat serve``
and ``mmcat eval`` share::

    from mmcat import Classifier
    clf = Classifier.load("RUN/best")
    p = clf.predict(image="shoe.jpg", title="Trail runner", description="...")
    p.label, p.score, p.top_k, p.modalities

A product goes through the steps a packed sample goes through in training, in the same functions:

- a raw photo (path, bytes, PIL image or array) is decoded by ``mmcat pack``'s decoder (pixel-count guard, EXIF
  orientation, alpha on white, reduced-scale JPEG decode) and cut to the loader's eval view (the region training
  showed: ``transforms.eval_box``, from the artifact's ``data.min_crop_scale``); a photo that was already packed
  (``mmcat predict`` on shards) is decoded exactly as ``mmcat eval`` decodes it;
- title and description are normalised and joined as ``mmcat pack`` writes the ``txt`` member;
- attributes (and any plug-in modality) are encoded by the modality itself from ``best/``'s own files;
- batches are collated by the training loader's collate (tokenizer, pixel layout) and run through the same forward.

Scores are calibrated: the logits are divided by the temperature fitted on the val split for the inputs the product
actually has (``best/calibration.json``, :mod:`mmcat.calibration`) before the softmax. Nothing is unpickled: weights
are safetensors, everything else JSON / YAML.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mmcat.calibration import input_mode, read_temperatures, temperature_for
from mmcat.data.transforms import EVAL_CROP_FRACTION, eval_view

ImageInput = Union[str, Path, bytes, bytearray, np.ndarray, Any]  # Any: a PIL image
PRODUCT_KEYS = ("id", "image", "title", "description", "text", "attributes")
MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb threshold, as in mmcat pack
MAX_IMAGE_BYTES = 50_000_000  # as mmcat pack's --max-image-bytes


@dataclass
class Prediction:
    """One product's answer. ``label`` is None when ``abstain`` (score under ``min_score``) or on ``error``;
    ``top_k`` always lists the best labels with their calibrated probabilities. ``modalities`` names the inputs
    the prediction used: ``fused`` (all the model takes), ``image_only``, ``text_only``, ``without_<m>`` ...;
    ``warnings`` says what was dropped (e.g. an image that does not decode, so the text alone was used)."""

    label: Optional[str]
    score: float
    top_k: List[Tuple[str, float]]
    modalities: str
    abstain: bool = False
    warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["top_k"] = [{"label": k, "score": s} for k, s in self.top_k]
        return out


@dataclass
class Prepared:
    """A product ready for a batch: what the training loader's collate takes, plus what was dropped."""

    pixels: Optional[np.ndarray]  # RGB uint8 [S, S, 3], the eval view
    text: Optional[str]
    modalities: Dict[str, Any]  # plug-in modality values (None where missing)
    warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None  # nothing usable: no forward for this one

    def present(self) -> List[str]:
        return (["image"] if self.pixels is not None else []) + (["text"] if self.text is not None else []) + \
            [k for k, v in self.modalities.items() if v is not None]


def join_text(*texts: Optional[str]) -> Optional[str]:
    """Title and description (or any number of text columns) as ``mmcat pack`` writes the ``txt`` member: each
    normalised, non-empty ones joined by a newline; None when all are empty."""
    from mmcat.pack.plan import normalize_text

    parts = [normalize_text(str(t)) for t in texts if t is not None]
    return "\n".join(p for p in parts if p) or None


class Preprocessor:
    """Products or packed samples -> :class:`Prepared`. Holds no model and pickles small, so ``mmcat predict``'s
    decode workers each get a copy."""

    def __init__(self, image_size: int, min_crop_scale: float, modalities: Sequence[Any] = (),
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        # min_crop_scale: the training run's; it decides the eval view's region (transforms.eval_box)
        self.size, self.min_scale, self.modalities = int(image_size), float(min_crop_scale), list(modalities)
        self.max_pixels, self.max_bytes = int(max_image_pixels), int(max_image_bytes)
        # a raw photo is decoded no smaller than the shorter side the eval view's centre crop (the smaller view) needs
        self.decode_side = int(round(self.size / EVAL_CROP_FRACTION))

    # ------------------------------------------------------------------------------------------ raw products
    def product(self, image: Optional[ImageInput] = None, title: Optional[str] = None,
                description: Optional[str] = None, text: Union[None, str, Sequence[Optional[str]]] = None,
                attributes: Optional[Mapping[str, Any]] = None, **extra: Any) -> Prepared:
        """``text`` (already joined, or a list of text fields joined like ``mmcat pack``'s ``--text-columns``)
        replaces title + description; ``extra``: values of plug-in modalities, by name. A photo that cannot be used
        becomes a warning when another input is there, else the error."""
        from mmcat.pack.images import ImageError

        known = {m.name for m in self.modalities}
        unknown = sorted(set(extra) - known - {"id"})
        if unknown:
            raise ValueError(f"unknown product field(s) {', '.join(unknown)}; a product has "
                             f"{', '.join(PRODUCT_KEYS + tuple(sorted(known - {'attributes'})))}")
        warnings: List[str] = []
        pixels = None
        if image is not None:
            try:
                pixels = self.photo(image)
            except ImageError as exc:
                warnings.append(f"image not used: {exc}")
        text = join_text(title, description) if text is None else \
            join_text(text) if isinstance(text, str) else join_text(*text)
        values = dict(extra, attributes=attributes) if attributes is not None else dict(extra)
        raw = {"json": json.dumps({k: v for k, v in values.items() if k != "id"}, default=str).encode()}
        prepared = Prepared(pixels, text, self._read_modalities(raw), warnings)
        return _check_usable(prepared, self.modalities)

    def photo(self, image: ImageInput) -> np.ndarray:
        """The eval view (RGB uint8 S x S) of a photo given as a path, encoded bytes, a PIL image or an array
        (HxWx3 RGB, HxW grey, HxWx4 RGBA; uint8); ImageError when it cannot be used."""
        import cv2

        from mmcat.pack.images import ImageError, decode_photo, read_image_bytes

        if isinstance(image, (str, Path)):
            image = read_image_bytes(str(image), self.max_bytes)
        if isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) > self.max_bytes:
                raise ImageError("image_file_too_large", f"{len(image)} bytes > {self.max_bytes}")
            bgr = decode_photo(bytes(image), self.decode_side, "shorter", self.max_pixels).image
            return eval_view(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.size, self.min_scale)
        if not isinstance(image, np.ndarray):  # a PIL image: encode losslessly, then the same decoder as bytes
            if not hasattr(image, "save"):
                raise ValueError(f"image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return self.photo(buf.getvalue())
        return eval_view(_rgb_array(image), self.size, self.min_scale)

    # --------------------------------------------------------------------------------------- packed samples
    def sample(self, raw: Mapping[str, Any]) -> Prepared:
        """A packed tar sample (member name -> bytes, as webdataset reads it): decoded exactly as ``mmcat eval``
        decodes it (:func:`mmcat.data.samples.decode_image`, eval view), so predictions on shards equal eval's."""
        from mmcat.data.samples import IMAGE_EXTS, BadSample, decode_image

        warnings: List[str] = []
        pixels = None
        data = next((raw[e] for e in IMAGE_EXTS if raw.get(e)), None)
        if data is not None:
            try:
                pixels = eval_view(decode_image(data, self.size), self.size, self.min_scale)
            except BadSample as exc:
                warnings.append(f"image not used: {exc}")
        text = None
        if raw.get("txt"):
            text = bytes(raw["txt"]).decode("utf-8", "replace").strip() or None
        prepared = Prepared(pixels, text, self._read_modalities(raw), warnings)
        return _check_usable(prepared, self.modalities)

    def _read_modalities(self, raw: Mapping[str, Any]) -> Dict[str, Any]:
        from mmcat.data.samples import BadSample

        out: Dict[str, Any] = {}
        for m in self.modalities:
            try:
                out[m.name] = m.read(raw)
            except BadSample:
                out[m.name] = None
        return out


def _rgb_array(image: np.ndarray) -> np.ndarray:
    import cv2

    from mmcat.pack.images import ImageError, _composite_on_white

    if image.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 4:  # RGBA: composite on white, as mmcat pack does
        return _composite_on_white(image)  # channel order does not matter to the blend
    raise ImageError("image_undecodable", f"array of shape {image.shape} (want HxW, HxWx3 RGB or HxWx4 RGBA)")


def _check_usable(p: Prepared, modalities: Sequence[Any]) -> Prepared:
    if not p.present():
        what = ["image", "text", *(m.name for m in modalities)]
        dropped = f" ({p.warnings[0]})" if p.warnings else ""
        p.error = f"nothing to predict from: no usable {', '.join(what[:-1])} or {what[-1]}{dropped}"
    return p


class Classifier:
    """A deployable artifact (``RUN_DIR/best``) ready to categorise products; see the module docstring."""

    def __init__(self, artifact: Any, temperatures: Dict[str, float], device: torch.device,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        from mmcat.data.loader import Collate, uint8_pixels
        from mmcat.data.samples import BadSampleCounter

        self.artifact, self.temperatures, self.device = artifact, dict(temperatures), device
        self.labels: List[str] = list(artifact.labels)
        self.modalities: List[str] = list(artifact.model.names)
        data = artifact.cfg.data
        self.preprocessor = Preprocessor(data.image_size, data.min_crop_scale, artifact.modalities, max_image_pixels,
                                         max_image_bytes)
        self._collate = Collate(artifact.tokenizer, int(data.max_text_length), int(data.image_size),
                                BadSampleCounter(strict=False), normalize=not uint8_pixels(data),
                                modalities=artifact.modalities)

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto", **limits: int) -> "Classifier":
        """Load ``best/`` from its own files (no hub, no training state, no pickle). ``device``: auto (CUDA when
        there is one), cpu, cuda, cuda:N. ``limits``: ``max_image_pixels``, ``max_image_bytes``."""
        from mmcat.artifact import load_artifact

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
        art = load_artifact(path, device=dev)
        return cls(art, read_temperatures(Path(path)), dev, **limits)

    @property
    def version(self) -> str:
        from mmcat import __version__

        return __version__

    # ------------------------------------------------------------------------------------------------ predict
    def predict(self, image: Optional[ImageInput] = None, title: Optional[str] = None,
                description: Optional[str] = None, attributes: Optional[Mapping[str, Any]] = None, *,
                top_k: int = 3, min_score: Optional[float] = None, **fields: Any) -> Prediction:
        """One product; ValueError when it has nothing usable (no image, text or attributes, or only a broken
        image)."""
        prepared = self.preprocessor.product(image=image, title=title, description=description,
                                             attributes=attributes, **fields)
        if prepared.error:
            raise ValueError(prepared.error)
        return self.predict_prepared([prepared], top_k, min_score)[0]

    def predict_batch(self, products: Iterable[Mapping[str, Any]], batch_size: int = 64, top_k: int = 3,
                      min_score: Optional[float] = None, errors: str = "raise") -> List[Prediction]:
        """Products as dicts (keys: image, title, description, text, attributes, id); one forward per
        ``batch_size``. ``errors="raise"``: ValueError at the first unusable product, naming its position;
        ``"record"``: its Prediction carries ``error`` and no label."""
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', not {errors!r}")
        out: List[Prediction] = []
        chunk: List[Prepared] = []
        for i, product in enumerate(products):
            p = self.preprocessor.product(**product)
            if p.error and errors == "raise":
                raise ValueError(f"product {i}: {p.error}")
            chunk.append(p)
            if len(chunk) >= batch_size:
                out.extend(self.predict_prepared(chunk, top_k, min_score))
                chunk = []
        out.extend(self.predict_prepared(chunk, top_k, min_score))
        return out

    def collate(self, prepared: Sequence[Prepared]) -> Dict[str, Any]:
        """A model batch of usable products (the training loader's collate; labels are placeholders)."""
        samples = [{"pixels": p.pixels, "text": p.text, "modalities": p.modalities, "label": 0, "key": str(i)}
                   for i, p in enumerate(prepared)]
        return self._collate(samples)

    @torch.inference_mode()
    def logits(self, batch: Dict[str, Any]) -> torch.Tensor:
        from accelerate.utils import send_to_device

        from mmcat.models.fusion import forward_batch

        return forward_batch(self.artifact.model, send_to_device(batch, self.device), "fused").float().cpu()

    def predict_prepared(self, prepared: Sequence[Prepared], top_k: int = 3,
                         min_score: Optional[float] = None) -> List[Prediction]:
        """One forward pass over the usable products; the others get a Prediction with ``error``."""
        usable = [p for p in prepared if not p.error]
        results = iter(self._predictions(usable, top_k, min_score) if usable else [])
        return [Prediction(None, 0.0, [], "none", False, list(p.warnings), p.error) if p.error else next(results)
                for p in prepared]

    def _predictions(self, prepared: Sequence[Prepared], top_k: int, min_score: Optional[float]) -> List[Prediction]:
        modes = [input_mode(p.present(), self.modalities) for p in prepared]
        logits = self.logits(self.collate(prepared))
        temps = torch.tensor([temperature_for(self.temperatures, m) for m in modes], dtype=torch.float32)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        k = max(1, min(int(top_k), len(self.labels)))
        scores, idx = probs.topk(k, dim=-1)
        out = []
        for p, mode, s, i in zip(prepared, modes, scores.tolist(), idx.tolist()):
            top = [(self.labels[j], float(v)) for j, v in zip(i, s)]
            abstain = min_score is not None and top[0][1] < min_score
            out.append(Prediction(None if abstain else top[0][0], top[0][1], top, mode, abstain, list(p.warnings)))
        return out
