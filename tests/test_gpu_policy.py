"""Where scoring runs its onnxruntime actors: the --gpu policy against the cluster's resources
and its GPU nodes' onnxruntime, and a GPU session that never falls back silently."""

import pytest

from covidray.cluster import score_on_gpu
from covidray.layout import RunLayout, ScoreLayout
from covidray.model import build_model
from covidray.onnx_export import export_onnx, model_metadata
from covidray.onnx_runtime import onnx_session
from covidray.stages.score import ScoreConfig, score_archive

from conftest import bad_archive


def test_scoring_uses_gpus_only_where_the_gpu_nodes_onnxruntime_can(capsys):
    cuda = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]  # noqa: E731
    cpu_only = lambda: ["CPUExecutionProvider"]  # noqa: E731
    nobody = lambda: None  # noqa: E731 - no GPU node answered the probe
    gpus, no_gpus = {"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0}
    assert score_on_gpu("auto", gpus, cuda) is True
    assert score_on_gpu("on", gpus, cuda) is True
    assert score_on_gpu("off", gpus, cuda) is False
    asked = []
    assert score_on_gpu("auto", no_gpus, lambda: asked.append(1)) is False
    assert not asked  # no GPU, no probe
    capsys.readouterr()
    assert score_on_gpu("auto", gpus, cpu_only) is False  # slower, not wrong: said, not failed
    assert "the GPU nodes has no CUDA provider" in capsys.readouterr().out
    assert score_on_gpu("auto", gpus, nobody) is False
    assert "no GPU node answered" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPU"):
        score_on_gpu("on", no_gpus, cuda)
    with pytest.raises(ValueError, match="--gpu on, but onnxruntime on the GPU nodes has no CUDA"):
        score_on_gpu("on", gpus, cpu_only)
    with pytest.raises(ValueError, match="--gpu on, but no GPU node answered"):
        score_on_gpu("on", gpus, nobody)


def test_the_probe_asks_a_node_that_holds_a_gpu_and_gives_up_when_none_can_answer():
    """On a real Ray instance that declares one GPU (none is used), then on one with none."""
    import subprocess
    import sys

    import onnxruntime

    script = """
import os
import ray
from covidray.cluster import providers_on_gpu_nodes
for gpus, timeout in ((1, 60), (0, 3)):
    ray.init(address="local", num_cpus=1, num_gpus=gpus, include_dashboard=False,
             logging_level="ERROR")
    print("GPUS", gpus, providers_on_gpu_nodes(ray, timeout), flush=True)
    if gpus:  # what a GPU actor relies on: Ray shows it its own GPU
        shown = ray.remote(num_gpus=1)(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        print("VISIBLE", ray.get(shown.remote()), flush=True)
    ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("GPUS", "VISIBLE"))]
    assert lines == [f"GPUS 1 {onnxruntime.get_available_providers()}", "VISIBLE 0",
                     "GPUS 0 None"], done.stdout + done.stderr[-2000:]


def test_a_gpu_session_never_falls_back_to_the_cpu_silently():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA (tests/test_gpu.py covers it)")
    model = export_onnx(build_model("none"), model_metadata(0.5, "none", {}, 0))
    assert onnx_session(model).get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="needs onnxruntime-gpu.*--gpu off"):
        onnx_session(model, gpu=True)


def test_the_cuda_of_onnxruntime_gpu_and_of_torch_must_agree(monkeypatch):
    import sys
    import types

    import torch

    from covidray.onnx_runtime import cuda_mismatch

    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info",
                        types.SimpleNamespace(cuda_version="13.0"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert cuda_mismatch() is None
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert "built for CUDA 13.0, torch here for CUDA 12.6" in cuda_mismatch()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "torch here is a CPU build" in cuda_mismatch()
    monkeypatch.delitem(sys.modules, "onnxruntime.capi.build_and_package_info")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert cuda_mismatch() == "this onnxruntime is not onnxruntime-gpu"


def test_gpu_on_a_cluster_without_gpus_fails_and_leaves_the_last_result(
        storage, trained_run, prefix, ray_local):
    model, output = RunLayout(trained_run["run"]).onnx, f"{prefix}/out"
    archive = f"{prefix}/archive"
    bad_archive(storage, archive)
    first = score_archive(ScoreConfig(archive, model, output, threshold=0.3), storage)
    layout = ScoreLayout(output)
    with pytest.raises(ValueError, match="--gpu on, but the Ray cluster has no GPU"):
        score_archive(ScoreConfig(archive, model, output, threshold=0.3, gpu="on"), storage)
    assert storage.read_json(layout.success) == first
    assert len(storage.read_parquet_dir(layout.predictions)) == first["scored"]
