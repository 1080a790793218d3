"""The model: a registry backbone (:mod:`covidray.backbones`) with a 2-class head, its
starting weights, and checkpoints.

Every model is a :class:`Classifier`: ``body`` (the backbone, images -> features) and ``fc``
(the head, features -> 2 logits), whatever the backbone, so freezing, feature caching,
export and Grad-CAM treat all backbones alike.

``weights`` names where the backbone starts:
  * ``"imagenet"``: the backbone's registry entry (:func:`covidray.backbones.imagenet_state`:
    an installed, sha256-checked file, or torchvision's own hash-checked download / cache);
  * ``"none"``: random initialisation;
  * a local path or ``s3://`` URI of a state dict (the backbone's native file, a covidray
    checkpoint, or a covidray ResNet18 state dict of before the registry), loaded with
    ``weights_only=True``.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from covidray.backbones import (BACKBONES, PAPER_BACKBONE, LoadedWeights, WeightsUnavailable,
                                fitting_backbone, get_backbone, imagenet_state, sha256_of,
                                to_covidray_keys)
from covidray.imaging.recipe import Recipe
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.storage import Storage

TRAIN_LAYERS = ("fc", "all")


class Classifier(nn.Module):
    """``body`` (images ``[N,3,224,224]`` -> features ``[N, width]``) then ``fc`` (2 logits)."""

    def __init__(self, backbone: str):
        super().__init__()
        entry = get_backbone(backbone)
        self.backbone = backbone
        self.body = entry.build()
        self.fc = nn.Linear(entry.width, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def recipe_for(backbone: str, window: str = "none") -> Recipe:
    """The preprocessing a model of ``backbone`` is trained, exported and scored with."""
    entry = get_backbone(backbone)
    return Recipe(mean=entry.mean, std=entry.std, window=window)


def build_model(weights: str = "none", storage: Storage | None = None,
                backbone: str = PAPER_BACKBONE) -> Classifier:
    """``backbone`` with a ``len(LABELS)``-way head, starting from ``weights``."""
    return build_with_provenance(weights, storage, backbone)[0]


def build_with_provenance(weights: str, storage: Storage | None,
                          backbone: str) -> tuple[Classifier, dict]:
    """:func:`build_model`, and what its weights were (:func:`weights_provenance`)."""
    model = Classifier(backbone)
    loaded = load_weights(weights, storage, backbone)
    if loaded is not None:
        state = to_covidray_keys(loaded.state, get_backbone(backbone))
        expected = model.state_dict()
        # Checked before loading: torch raises its own multi-line error on a tensor of
        # another shape (a head of another backbone's width), even with strict=False.
        allowed_missing = set() if "fc.weight" in state else {"fc.weight", "fc.bias"}
        missing = sorted(set(expected) - set(state) - allowed_missing)
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(state) & set(expected)
                          if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or reshaped:
            fits = fitting_backbone(loaded.state)
            hint = (f": it is a {fits} file, train with --backbone {fits}" if fits and
                    fits != backbone else ": pass a state dict of this architecture")
            raise WeightsUnavailable(
                f"weights '{weights}' do not fit {backbone} (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, other shape {reshaped[:3]}){hint}")
        model.load_state_dict(state, strict=False)
    return model, weights_provenance(weights, backbone, loaded)


def initial_model(weights: str, seed: int, storage: Storage | None = None,
                  backbone: str = PAPER_BACKBONE) -> Classifier:
    """The run's starting model: the same in every process that builds it for one run
    (the seed fixes the random head, and the backbone too when ``weights`` is ``none``)."""
    torch.manual_seed(seed)
    return build_model(weights, storage, backbone)


def load_weights(weights: str, storage: Storage | None = None,
                 backbone: str = PAPER_BACKBONE) -> LoadedWeights | None:
    """The tensors ``weights`` names for ``backbone`` (None for ``none``), with their origin."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return imagenet_state(get_backbone(backbone))
    storage = storage or Storage()
    try:
        data = storage.read_bytes(weights)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights '{weights}': {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"'{weights}' is not a torch state dict "
                                 f"({type(exc).__name__}: {exc})") from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"'{weights}' holds no state dict")
    return LoadedWeights(state, weights, sha256_of(data), "that of the file given (not "
                         "checked by covidray)")


def resolve_weights(weights: str, storage: Storage, backbone: str = PAPER_BACKBONE) -> str:
    """``auto`` -> ``imagenet`` when those weights load here, else ``none`` (and say so)."""
    if weights != "auto":
        return weights
    try:
        load_weights("imagenet", storage, backbone)
        return "imagenet"
    except WeightsUnavailable as exc:
        print(f"ImageNet weights for {backbone} do not load here ({exc}): training from "
              "random initialisation (weights none). See README 'Backbones and weights'.")
        return "none"


def weights_provenance(weights: str, backbone: str, loaded: LoadedWeights | None) -> dict:
    """What a model started from, as checkpoints, ONNX metadata and model cards record it."""
    if loaded is None:
        return {"backbone": backbone, "weights": weights,
                "source": "random initialisation (no pretrained weights)", "sha256": "",
                "licence": "n/a"}
    return {"backbone": backbone, "weights": weights, "source": loaded.source,
            "sha256": loaded.sha256, "licence": loaded.licence}


def describe_weights(provenance: dict) -> str:
    """One line naming a model's starting weights, as results report it."""
    digest = f", sha256 {provenance['sha256']}" if provenance.get("sha256") else ""
    return f"{provenance['backbone']}: {provenance['source']}{digest}"


def freeze_for(model: nn.Module, train_layers: str) -> nn.Module:
    """Make only the layers named by ``train_layers`` (``fc`` or ``all``) trainable."""
    if train_layers not in TRAIN_LAYERS:
        raise ValueError(f"train_layers must be one of {TRAIN_LAYERS}, not '{train_layers}'")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = train_layers == "all" or name.startswith("fc.")
    return model


def set_train_mode(model: nn.Module, train_layers: str) -> None:
    """Training mode for what trains; a frozen backbone stays in eval mode so its
    BatchNorm statistics stay fixed (it is a pure feature extractor, as in the paper)."""
    if train_layers == "all":
        model.train()
    else:
        model.eval()
        head(model).train()


def head(model: nn.Module) -> nn.Linear:
    return getattr(model, "module", model).fc


def cam_layer(model: Classifier) -> nn.Module:
    """The layer Grad-CAM explains: the backbone's last convolutional block."""
    return model.body.get_submodule(get_backbone(model.backbone).cam_layer)


def covid_probability(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, 2]`` -> probability of the positive class ``[N]``."""
    return torch.softmax(logits, dim=1)[:, LABELS.index(POSITIVE_LABEL)]


class ScoringModel(nn.Module):
    """What is exported: input ``float32[N,3,224,224]`` -> (logits, class probabilities)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def load_checkpoint(storage: Storage, uri: str) -> dict:
    """A covidray checkpoint dict: ``{model, optimizer, epoch, config, history, weights}``."""
    return checkpoint_from_bytes(storage.read_bytes(uri))


def checkpoint_from_bytes(data: bytes) -> dict:
    """The checkpoint dict of a ``checkpoint.pt`` file's bytes (:func:`checkpoint_bytes`)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def checkpoint_bytes(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def checkpoint_backbone(checkpoint: dict) -> str:
    """The backbone a checkpoint's model is (ResNet18 for those of before the registry)."""
    return checkpoint["config"].get("backbone", PAPER_BACKBONE)


def checkpoint_recipe(checkpoint: dict) -> Recipe:
    """The preprocessing a checkpoint's model was trained with."""
    return recipe_for(checkpoint_backbone(checkpoint), checkpoint["config"].get("window", "none"))


def model_from_checkpoint(checkpoint: dict) -> Classifier:
    backbone = checkpoint_backbone(checkpoint)
    model = Classifier(backbone)
    model.load_state_dict(to_covidray_keys(checkpoint["model"], BACKBONES[backbone]))
    return model.eval()
