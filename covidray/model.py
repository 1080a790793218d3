"""The model: torchvision ResNet18 with a 2-class head, its starting weights, and checkpoints.

``weights`` names where the backbone starts:
  * ``"imagenet"``: torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (downloaded and
    hash-checked by torchvision, or read from its cache ``$TORCH_HOME/hub/checkpoints``);
  * ``"none"``: random initialisation;
  * a local path or ``s3://`` URI of a state dict (a torchvision file, or a covidray
    checkpoint), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.storage import Storage

IMAGENET_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
TRAIN_LAYERS = ("fc", "all")


class WeightsUnavailable(RuntimeError):
    """The requested starting weights cannot be loaded; the message says how to supply them."""


def build_model(weights: str = "none", storage: Storage | None = None) -> nn.Module:
    """ResNet18 with a ``len(LABELS)``-way head, starting from ``weights``."""
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, len(LABELS))
    state = load_weights(weights, storage)
    if state is not None:
        head_fits = tuple(state.get("fc.weight", torch.empty(0)).shape) == tuple(model.fc.weight.shape)
        if not head_fits:  # an ImageNet (1000-class) file: keep our fresh 2-class head
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed_missing = set() if head_fits else {"fc.weight", "fc.bias"}
        if set(missing) - allowed_missing or unexpected:
            raise WeightsUnavailable(f"weights '{weights}' do not fit ResNet18: missing "
                                     f"{sorted(set(missing) - allowed_missing)[:5]}, unexpected "
                                     f"{sorted(unexpected)[:5]}")
    return model


def initial_model(weights: str, seed: int, storage: Storage | None = None) -> nn.Module:
    """The run's starting model: the same in every process that builds it for one run
    (the seed fixes the random head, and the backbone too when ``weights`` is ``none``)."""
    torch.manual_seed(seed)
    return build_model(weights, storage)


def load_weights(weights: str, storage: Storage | None = None) -> dict | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        from torchvision.models import ResNet18_Weights

        try:
            return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:
            raise WeightsUnavailable(
                f"ImageNet weights could not be fetched ({type(exc).__name__}: {exc}). On an "
                f"air-gapped cluster, pre-stage them: download {IMAGENET_URL} elsewhere and "
                "either copy it to $TORCH_HOME/hub/checkpoints/ on every node, or upload it to "
                "your storage and pass --weights s3://BUCKET/resnet18-f37072fd.pth "
                "(or a local path)") from exc
    storage = storage or Storage()
    try:
        data = storage.read_bytes(weights)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights '{weights}': {exc}") from exc
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"'{weights}' holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def describe_weights(weights: str) -> str:
    """What a ``weights`` value means, as results report it."""
    return {"imagenet": "torchvision ResNet18_Weights.IMAGENET1K_V1",
            "none": "random initialisation (no pretrained weights)"}.get(weights, weights)


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


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    model = build_model("none")
    model.load_state_dict(checkpoint["model"])
    return model.eval()
