"""Does the model read the lungs or the hospital? Saliency and a shortcut audit.

Models trained on mixed-source COVID-19 chest X-rays are known to learn the source (text
markers, borders, positioning) instead of the disease (Roberts et al. 2021; DeGrave et
al. 2021). Three checks, all on held-out images, all pure functions of a model and the
pixels the one recipe produced (``uint8[N, 224, 224]``):

* :func:`grad_cam` -- where the model looks (Grad-CAM on the last convolutional block,
  captum), for a fixed sample of true positives, false positives and false negatives
  (:func:`saliency_sample`);
* :func:`source_and_label_predictability` -- how well the penultimate features predict
  the image's *source*, next to how well they predict the *label* within each source that
  holds both classes (cross-validated logistic regression, folds by patient);
* :func:`border_test` -- scores with everything outside the central lung region blanked,
  and with the central region blanked (borders only), against the originals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from covidray.imaging.recipe import PAPER_RECIPE, Recipe
from covidray.metrics import is_positive, roc_auc

# The central region a frontal chest X-ray's lungs fill after the recipe's centre crop:
# rows and columns 12.5% .. 87.5% of 224 (28 .. 196). Everything else is "border".
LUNG_BOX = (28, 196, 28, 196)  # top, bottom, left, right
SALIENCY_KINDS = ("true_positive", "false_positive", "false_negative")


# --- saliency ----------------------------------------------------------------------------

def saliency_sample(frame: pd.DataFrame, threshold: float, per_kind: int, seed: int) -> dict:
    """``{kind: rows}`` for :data:`SALIENCY_KINDS`: the most confident of each (highest
    scores for TP and FP, lowest for FN), ties broken by a seeded order."""
    order = np.random.default_rng(seed).permutation(len(frame))
    frame = frame.iloc[order].reset_index(drop=True)
    positive = is_positive(frame["score"].to_numpy(float), threshold)
    covid = frame["target"].to_numpy() == 1
    chosen = {"true_positive": frame[positive & covid].sort_values("score", ascending=False,
                                                                   kind="stable"),
              "false_positive": frame[positive & ~covid].sort_values("score", ascending=False,
                                                                     kind="stable"),
              "false_negative": frame[~positive & covid].sort_values("score", kind="stable")}
    return {kind: rows.head(per_kind) for kind, rows in chosen.items()}


def grad_cam(model: nn.Module, pixels: np.ndarray, target_class: int = 1,
             recipe: Recipe = PAPER_RECIPE) -> np.ndarray:
    """Grad-CAM heat maps (``float32[N, 224, 224]`` in [0, 1]) of ``target_class`` on the
    backbone's last convolutional block (its registry ``cam_layer``: ``layer4`` of the
    ResNet), upsampled to the input; ``recipe``: the model's preprocessing."""
    from captum.attr import LayerAttribution, LayerGradCam

    from covidray.model import cam_layer

    if not len(pixels):
        return np.zeros((0, *pixels.shape[1:]), dtype=np.float32)
    model = model.eval()
    inputs = torch.from_numpy(recipe.normalize(pixels)).requires_grad_(True)
    cam = LayerGradCam(model, cam_layer(model)).attribute(inputs, target=target_class,
                                                          relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(pixels.shape[1:]), "bilinear")
    maps = cam.detach()[:, 0].numpy().astype(np.float32)
    peaks = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)


def central_share(maps: np.ndarray, box=LUNG_BOX) -> np.ndarray:
    """Per heat map, the fraction of its mass inside the central lung region."""
    if not len(maps):
        return np.zeros(0)
    top, bottom, left, right = box
    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = maps[:, top:bottom, left:right].reshape(len(maps), -1).sum(axis=1)
    return np.divide(inside, total, out=np.full(len(maps), np.nan), where=total > 0)


# --- shortcut audit ----------------------------------------------------------------------

def _cross_validated_scores(features, targets, groups, seed: int, folds: int = 5):
    """Out-of-fold probabilities of a standardised logistic regression, folds by patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    smallest = int(pd.Series(targets).value_counts().min())
    folds = min(folds, smallest, len(set(groups)))
    if folds < 2:
        return None
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    return cross_val_predict(classifier, features, targets, groups=groups, method="predict_proba",
                             cv=StratifiedGroupKFold(folds, shuffle=True, random_state=seed))


def source_and_label_predictability(features: np.ndarray, frame: pd.DataFrame, seed: int,
                                    min_images: int = 10) -> dict:
    """Cross-validated AUCs from the penultimate features: of the *source* (one source
    against the rest, for each source with ``min_images``), and of the *label* within each
    source that holds at least ``min_images // 2`` images of both classes."""
    sources = frame["source"].astype(str).to_numpy()
    groups = frame["group"].astype(str).to_numpy()
    targets = frame["target"].to_numpy()
    counts = pd.Series(sources).value_counts()
    kept = counts[counts >= min_images].index.tolist()
    source = {"sources": kept, "per_source": {}, "macro_auc": None}
    if len(kept) >= 2:
        mask = np.isin(sources, kept)
        probabilities = _cross_validated_scores(features[mask], sources[mask], groups[mask], seed)
        if probabilities is not None:
            classes = sorted(kept)
            for column, name in enumerate(classes):
                source["per_source"][name] = roc_auc(probabilities[:, column],
                                                     (sources[mask] == name).astype(int))
            source["macro_auc"] = float(np.mean(list(source["per_source"].values())))
    within = []
    for name in sorted(set(sources)):
        mask = sources == name
        covid, other = int(targets[mask].sum()), int((targets[mask] == 0).sum())
        if min(covid, other) < max(2, min_images // 2):
            continue
        probabilities = _cross_validated_scores(features[mask], targets[mask], groups[mask], seed)
        within.append({"source": name, "covid": covid, "non_covid": other,
                       "label_auc": None if probabilities is None
                       else roc_auc(probabilities[:, 1], targets[mask])})
    return {"source": source, "label_within_source": within}


def blank(pixels: np.ndarray, keep: str, box=LUNG_BOX) -> np.ndarray:
    """``keep="lungs"``: everything outside the central region set to black;
    ``keep="border"``: the central region set to black."""
    top, bottom, left, right = box
    out = pixels.copy()
    if keep == "lungs":
        inside = out[:, top:bottom, left:right].copy()
        out[:] = 0
        out[:, top:bottom, left:right] = inside
    elif keep == "border":
        out[:, top:bottom, left:right] = 0
    else:
        raise ValueError(f"keep must be 'lungs' or 'border', not '{keep}'")
    return out


def border_test(score, pixels: np.ndarray, targets: np.ndarray, threshold: float,
                original: np.ndarray | None = None) -> dict:
    """``score(pixels) -> scores``. AUC and mean score change with the border blanked (lungs
    only) and with the lungs blanked (border only), against the original images (whose
    scores, ``original``, are computed here unless given)."""
    original = score(pixels) if original is None else np.asarray(original)
    result = {"original_auc": _auc(original, targets), "variants": {}}
    for keep in ("lungs", "border"):
        changed = score(blank(pixels, keep))
        result["variants"][keep] = {
            "auc": _auc(changed, targets),
            "mean_abs_score_change": float(np.mean(np.abs(changed - original))),
            "decisions_flipped": float(np.mean(is_positive(changed, threshold)
                                               != is_positive(original, threshold)))}
    return result


def _auc(scores, targets):
    targets = np.asarray(targets)
    return roc_auc(scores, targets) if (targets == 1).any() and (targets == 0).any() else None


def plain_reading(audit: dict) -> str:
    """One paragraph that says what the audit numbers mean, good or bad."""
    source, within = audit["predictability"]["source"], audit["predictability"]["label_within_source"]
    border = audit["border"]
    parts = []
    if source["macro_auc"] is not None:
        parts.append(f"The penultimate features tell the image's source apart with a "
                     f"cross-validated AUC of {source['macro_auc']:.2f} (one source against the "
                     f"rest, averaged over {len(source['sources'])} sources).")
    scored = [w for w in within if w["label_auc"] is not None]
    if scored:
        listing = ", ".join(f"{w['source']} {w['label_auc']:.2f}" for w in scored)
        parts.append(f"The same features predict the label within the sources that hold both "
                     f"classes with AUC {listing}.")
        if source["macro_auc"] is not None and source["macro_auc"] - min(
                w["label_auc"] for w in scored) > 0.15:
            parts.append("The source is far easier to read than the disease within a source: "
                         "a model on these features can reach a high headline AUC by "
                         "recognising where an image came from, and the headline should not "
                         "be read as detection of COVID-19.")
    else:
        parts.append("No held-out source holds enough images of both classes to measure "
                     "the label within a source, so the headline AUC cannot be separated "
                     "from source recognition here.")
    lungs, edge = border["variants"]["lungs"], border["variants"]["border"]
    if border["original_auc"] is not None and edge["auc"] is not None:
        parts.append(f"With only the border left (central lung region blanked) the test AUC is "
                     f"{edge['auc']:.2f} against {border['original_auc']:.2f} on the original "
                     f"images; with only the lungs left it is {lungs['auc']:.2f}, and "
                     f"{100 * lungs['decisions_flipped']:.0f}% of decisions change.")
        if edge["auc"] >= 0.75:
            parts.append("Borders alone separate the classes well: the model (or the data) "
                         "carries a shortcut outside the lungs -- markers, collimation, "
                         "text or positioning.")
    return " ".join(parts)
