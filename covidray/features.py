"""Frozen-backbone training computes each image's backbone features once.

When only the last layer trains (``--train-layers fc``, the paper's protocol), the
backbone is a fixed function: running it every epoch repeats the same work. Instead a
Ray Data pass maps every (augmented) training and validation image to its backbone
feature vector (:class:`BackboneFeatures`; 512-d for ResNet18, 1280-d for MobileNetV2 and
EfficientNet-Lite0: each registry entry's ``feature_layer``), the vectors are stored with the
run, and the head trains for all epochs on them with the same plain-PyTorch loop
(``covidray.loop.train_one_epoch`` on the head alone).
``tests/test_features.py`` proves both routes give the same head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from covidray.backbones import PAPER_BACKBONE
from covidray.imaging.recipe import model_inputs
from covidray.model import head, initial_model, recipe_for
from covidray.storage import Storage


def backbone(model: nn.Module) -> nn.Sequential:
    """Everything before the head: images ``[N,3,224,224]`` -> features ``[N, width]``."""
    return nn.Sequential(getattr(model, "module", model).body, nn.Flatten(1))


@torch.inference_mode()
def extract_features(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Backbone features of normalised inputs, in eval mode (fixed BatchNorm statistics), on
    the model's device. Channels-last memory (the model's weights are converted in place,
    same values): torch's CPU convolutions run it about 1.4x faster here; features agree to
    float rounding."""
    model.eval()
    network = backbone(model).to(memory_format=torch.channels_last)
    device = next(network.parameters()).device
    images = torch.from_numpy(inputs).to(device).contiguous(memory_format=torch.channels_last)
    return np.ascontiguousarray(network(images).cpu().numpy())


class BackboneFeatures:
    """Ray Data callable: loaded image batch -> the same rows with ``features`` instead of pixels."""

    def __init__(self, weights: str, seed: int, storage: Storage,
                 backbone: str = PAPER_BACKBONE, window: str = "none", threads: int = 1,
                 device: str = "cpu"):
        torch.set_num_threads(threads)
        # "cuda" only in an actor that reserved a GPU: Ray then shows it that GPU alone (an
        # actor that reserved none still sees every GPU of its node, used by others).
        self.model = initial_model(weights, seed, storage, backbone).eval().to(device)
        self.width = head(self.model).in_features
        self.recipe = recipe_for(backbone, window)

    def __call__(self, batch: dict) -> dict:
        inputs, ok = model_inputs(batch, self.recipe)
        features = np.zeros((len(ok), self.width), dtype=np.float32)
        if ok.any():
            features[ok] = extract_features(self.model, inputs)
        return {"uri": batch["uri"], "copy": batch["copy"], "target": batch["target"],
                "error": batch["error"], "features": features}
