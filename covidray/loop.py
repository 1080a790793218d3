"""The plain PyTorch training loop: epoch and evaluation functions, no Ray.

:func:`train_one_epoch` and :func:`evaluate` run over any iterable of numpy batches
(``pixels`` or cached ``features``, ``target``, ``error``), so they are tested without a
cluster; :mod:`covidray.stages.train` runs them inside each Ray Train worker.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from covidray.imaging.recipe import PAPER_RECIPE, Recipe, model_inputs
from covidray.metrics import roc_auc, summarise
from covidray.model import covid_probability, describe_weights, set_train_mode


def batch_tensors(batch: dict, device: torch.device,
                  recipe: Recipe = PAPER_RECIPE) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch -> (inputs, targets) on ``device``, dropping rows that failed to load."""
    inputs, ok = model_inputs(batch, recipe)
    x = torch.from_numpy(inputs).to(device)
    y = torch.from_numpy(np.asarray(batch["target"])[ok].astype(np.int64)).to(device)
    return x, y


def train_one_epoch(model: nn.Module, criterion, optimizer, batches: Iterable[dict],
                    device: torch.device, train_layers: str,
                    recipe: Recipe = PAPER_RECIPE) -> dict:
    set_train_mode(model, train_layers)
    total_loss, seen = 0.0, 0
    for batch in batches:
        x, y = batch_tensors(batch, device, recipe)
        if not len(y):
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        seen += len(y)
    return {"train_loss": total_loss / max(seen, 1), "train_images": seen}


@torch.inference_mode()
def evaluate(model: nn.Module, criterion, batches: Iterable[dict], device: torch.device,
             threshold: float, recipe: Recipe = PAPER_RECIPE) -> dict:
    model.eval()
    losses, scores, targets = [], [], []
    for batch in batches:
        x, y = batch_tensors(batch, device, recipe)
        if not len(y):
            continue
        logits = model(x)
        losses.append(criterion(logits, y).item() * len(y))
        scores.append(covid_probability(logits).cpu().numpy())
        targets.append(y.cpu().numpy())
    if not scores:
        return {"val_images": 0}
    scores, targets = np.concatenate(scores), np.concatenate(targets)
    at = summarise(scores, targets, [threshold]).counts_at(threshold)
    return {"val_images": int(len(targets)), "val_loss": float(sum(losses) / len(targets)),
            "val_auc": roc_auc(scores, targets), "val_sensitivity": at.sensitivity,
            "val_specificity": at.specificity, "val_threshold": threshold}


def make_checkpoint(model: nn.Module, optimizer, epoch: int, config: dict,
                    history: list[dict], provenance: dict) -> dict:
    """The checkpoint dict: ``{model, optimizer, epoch, config, history, weights,
    weights_provenance}`` (``provenance``: :func:`covidray.model.weights_provenance`)."""
    state = getattr(model, "module", model).state_dict()
    return {"model": {k: v.detach().cpu() for k, v in state.items()},
            "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config,
            "history": history, "weights": describe_weights(provenance),
            "weights_provenance": provenance}


def in_memory(batches: Iterable[dict], columns=("features", "target", "error")) -> dict:
    """A few MB of cached features pulled into arrays once (instead of a data pass an epoch),
    in (uri, copy) order. Ray Data delivers rows in the order its tasks finish, which varies
    between runs; each epoch's seeded shuffle must start from one order for a run to repeat."""
    parts = {c: [] for c in (*columns, "uri", "copy")}
    for batch in batches:
        for c in parts:
            parts[c].append(np.asarray(batch[c]))
    arrays = {c: np.concatenate(v) if v else np.empty(0) for c, v in parts.items()}
    order = np.lexsort((arrays["copy"], arrays["uri"].astype(str)))  # by uri, then copy
    return {c: arrays[c][order] for c in columns}


def shuffled_batches(arrays: dict, batch_size: int, seed: int) -> Iterator[dict]:
    """One epoch over in-memory arrays in a seeded random order."""
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n, batch_size):
        take = order[start:start + batch_size]
        yield {c: v[take] for c, v in arrays.items()}


def ordered_batches(arrays: dict, batch_size: int) -> Iterator[dict]:
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        yield {c: v[start:start + batch_size] for c, v in arrays.items()}
