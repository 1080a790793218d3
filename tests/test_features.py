"""Training the head on cached backbone features gives the head the image loop gives."""

import pytest
import torch
from torch import nn

from covidray.cluster import plan_resources
from covidray.imaging.recipe import model_inputs
from covidray.features import backbone, extract_features
from covidray.model import build_model, freeze_for, head
from covidray.loop import evaluate, train_one_epoch

from test_model_and_loop import synthetic_batches

TOLERANCE = 1e-5  # max |difference| between the two heads' weights after training


def test_backbone_plus_head_is_the_model():
    model = build_model("none").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(model.fc(backbone(model)(x)), model(x), atol=1e-5)


def test_cached_features_train_the_same_head_as_the_image_loop(tmp_path):
    batches = synthetic_batches(tmp_path, n=24, batch_size=8)
    device, criterion, epochs = torch.device("cpu"), nn.CrossEntropyLoss(), 5

    torch.manual_seed(0)
    straight = freeze_for(build_model("none"), "fc")
    torch.manual_seed(0)
    cached = freeze_for(build_model("none"), "fc")
    assert torch.equal(straight.fc.weight, cached.fc.weight)

    # Straightforward: the backbone runs on every image in every epoch.
    optimizer = torch.optim.Adam([p for p in straight.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(epochs):
        train_one_epoch(straight, criterion, optimizer, batches, device, "fc")

    # Cached: the backbone runs once; the head trains on the stored features.
    feature_batches = [{"features": extract_features(cached, model_inputs(b)[0]),
                        "target": b["target"], "error": b["error"]} for b in batches]
    optimizer = torch.optim.Adam(head(cached).parameters(), lr=1e-3)
    for _ in range(epochs):
        train_one_epoch(head(cached), criterion, optimizer, feature_batches, device, "all")

    difference = (straight.fc.weight - cached.fc.weight).abs().max().item()
    assert difference <= TOLERANCE
    assert (straight.fc.bias - cached.fc.bias).abs().max().item() <= TOLERANCE
    assert not torch.equal(cached.fc.weight, build_model("none").fc.weight)  # it did train
    # and the two evaluate alike
    image_eval = evaluate(straight, criterion, batches, device, 0.5)
    feature_eval = evaluate(head(cached), criterion, feature_batches, device, 0.5)
    assert image_eval["val_loss"] == pytest.approx(feature_eval["val_loss"], abs=1e-5)


def test_resource_plan_leaves_cpus_for_data_on_a_two_cpu_cluster():
    plan = plan_resources({"CPU": 2.0}, workers=1)
    assert plan.worker_cpus == 1.0 and plan.data_cpus == 0.5
    assert plan.worker_cpus * plan.workers < 2.0
    two = plan_resources({"CPU": 2.0}, workers=2)
    assert two.worker_cpus == 0.5 and two.worker_cpus * 2 < 2.0
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        plan_resources({"CPU": 8.0, "GPU": 1.0}, workers=2, use_gpu=True)


def test_inference_runs_one_actor_per_gpu_and_leaves_the_cpus_to_decoding():
    cpu = plan_resources({"CPU": 16.0, "GPU": 2.0})  # GPUs there, but not asked for
    assert (cpu.scoring_actors, cpu.inference_threads, cpu.inference_gpus,
            cpu.inference_batch) == (8, 2, 0.0, 32)
    gpu = plan_resources({"CPU": 16.0, "GPU": 2.0}, use_gpu=True)
    assert (gpu.scoring_actors, gpu.inference_threads, gpu.inference_gpus,
            gpu.inference_batch) == (2, 1, 1.0, 128)
    assert gpu.decode_cpus == cpu.decode_cpus  # the 16 CPUs still decode
    assert plan_resources({"CPU": 8.0, "GPU": 1.5}, use_gpu=True).scoring_actors == 1


def test_local_paths_are_refused_only_on_a_cluster_of_several_nodes():
    from covidray.cluster import require_object_storage

    require_object_storage(1, archive="/data/archive", output="./scores")  # one machine: fine
    require_object_storage(3, archive="s3://b/archive", weights="imagenet", model=None)
    with pytest.raises(ValueError, match=r"--output ./scores is a local path, but this Ray "
                                         r"cluster has 3 nodes.*--output s3://"):
        require_object_storage(3, archive="s3://b/archive", output="./scores")
