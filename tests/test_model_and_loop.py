"""The model, its starting weights, and the plain PyTorch loop (no Ray)."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from covidray.backbones import WeightsUnavailable
from covidray.imaging.loader import load_pixels
from covidray.model import build_model, checkpoint_bytes, freeze_for, load_weights, set_train_mode
from covidray.synthetic import encode, synthetic_xray
from covidray.loop import evaluate, in_memory, shuffled_batches, train_one_epoch


def imagenet_like_state_dict(seed: int = 0) -> dict:
    """What torchvision's resnet18-f37072fd.pth holds: a 1000-class state dict."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return resnet18(weights=None, num_classes=1000).state_dict()


def test_imagenet_shaped_file_from_s3_loads_backbone_and_fresh_head(storage, prefix):
    state = imagenet_like_state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(f"{prefix}/resnet18.pth", buffer.getvalue())
    model = build_model(f"{prefix}/resnet18.pth", storage)
    assert torch.equal(model.body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.fc.out_features == 2


def test_covidray_checkpoint_loads_with_its_head(tmp_path):
    source = build_model("none")
    path = tmp_path / "model.pt"
    path.write_bytes(checkpoint_bytes({"model": source.state_dict(), "epoch": 0}))
    loaded = build_model(str(path))
    assert torch.equal(loaded.fc.weight, source.fc.weight)


def test_a_file_that_is_not_resnet18_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsUnavailable, match="do not fit resnet18"):
        build_model(str(path))


def test_a_file_of_another_backbone_is_refused_naming_the_one_it_fits(tmp_path):
    from torchvision.models import mobilenet_v2

    path = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="it is a mobilenet_v2 file, train with "
                                                 "--backbone mobilenet_v2"):
        build_model(str(path), backbone="resnet18")
    model = build_model(str(path), backbone="mobilenet_v2")  # and it fits where it belongs
    assert model.fc.in_features == 1280


def test_a_covidray_model_of_another_backbone_is_refused_in_one_line(tmp_path):
    """Its 2-class head is 1280 wide, not ResNet18's 512: the refusal names the backbone,
    not torch's size-mismatch error."""
    path = tmp_path / "mobilenet-covidray.pt"
    torch.save(build_model("none", backbone="mobilenet_v2").state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="other shape \\['fc.weight'\\].*it is a "
                                                 "mobilenet_v2 file"):
        build_model(str(path), backbone="resnet18")


def test_missing_weights_file_says_so(tmp_path):
    with pytest.raises(WeightsUnavailable, match="cannot read weights"):
        build_model(str(tmp_path / "absent.pth"))


def test_imagenet_weights_load_or_explain_how_to_prestage(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: forces a download
    try:
        loaded = load_weights("imagenet")
    except WeightsUnavailable as exc:  # no internet (as on this project's machines)
        assert "resnet18-f37072fd.pth" in str(exc) and "--weights s3://" in str(exc)
    else:
        assert loaded.state["fc.weight"].shape == (1000, 512)


def test_fc_mode_trains_only_the_head_and_keeps_batchnorm_fixed():
    model = freeze_for(build_model("none"), "fc")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    set_train_mode(model, "fc")
    assert not model.body.bn1.training and model.fc.training
    freeze_for(model, "all")
    set_train_mode(model, "all")
    assert all(p.requires_grad for p in model.parameters()) and model.body.bn1.training


def synthetic_batches(tmp_path, n=24, batch_size=8):
    rng = np.random.default_rng(0)
    uris, labels = [], []
    for i in range(n):
        label = "covid" if i % 2 else "non_covid"
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(synthetic_xray(label == "covid", rng), "png"))
        uris.append(str(path))
        labels.append(label)
    from covidray.storage import Storage

    loaded = load_pixels({"uri": np.asarray(uris), "label": np.asarray(labels, dtype=object)},
                         Storage())
    return [{k: v[i:i + batch_size] for k, v in loaded.items()} for i in range(0, n, batch_size)]


def test_plain_loop_learns_without_ray_and_leaves_backbone_untouched(tmp_path):
    torch.manual_seed(0)
    batches = synthetic_batches(tmp_path)
    model = freeze_for(build_model("none"), "fc")
    backbone_before = model.body.layer3[0].conv1.weight.clone()
    running_mean_before = model.body.bn1.running_mean.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    before = evaluate(model, criterion, batches, torch.device("cpu"), 0.5)
    for _ in range(8):
        train_one_epoch(model, criterion, optimizer, batches, torch.device("cpu"), "fc")
    after = evaluate(model, criterion, batches, torch.device("cpu"), 0.5)
    assert after["val_loss"] < before["val_loss"]
    assert after["val_auc"] > 0.8
    assert torch.equal(model.body.layer3[0].conv1.weight, backbone_before)
    assert torch.equal(model.body.bn1.running_mean, running_mean_before)


def test_cached_features_train_in_the_same_order_whatever_order_ray_delivers_them():
    # Ray Data hands rows over as its tasks finish; a rerun of the same command must still
    # see each epoch's batches in the same order (and so train the same head).
    rng = np.random.default_rng(0)
    rows = {"uri": np.array([f"s3://b/img-{i % 5}.png" for i in range(10)], dtype=object),
            "copy": np.array([i // 5 for i in range(10)]),
            "features": rng.normal(size=(10, 4)).astype(np.float32),
            "target": rng.integers(0, 2, 10), "error": np.array([""] * 10, dtype=object)}

    def delivered(order, sizes):
        shuffled = {c: v[order] for c, v in rows.items()}
        cuts = np.cumsum([0, *sizes])
        return [{c: v[a:b] for c, v in shuffled.items()} for a, b in zip(cuts, cuts[1:])]

    first = in_memory(delivered(np.arange(10), [4, 6]))
    second = in_memory(delivered(rng.permutation(10), [3, 3, 4]))
    for c in ("features", "target", "error"):
        np.testing.assert_array_equal(first[c], second[c])
    for a, b in zip(shuffled_batches(first, 3, seed=7), shuffled_batches(second, 3, seed=7)):
        np.testing.assert_array_equal(a["features"], b["features"])
