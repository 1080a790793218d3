"""GPU paths: training with --use-gpu and scoring on onnxruntime's CUDA provider. They skip
cleanly on machines without a GPU (this project's CI has none)."""

import pytest
import torch

from conftest import upload_synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def test_training_with_use_gpu_trains_on_the_gpu(storage, ray_local, prefix):
    from covidray.stages.train import TrainConfig, fit

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray instance sees no GPU")
    manifest = upload_synthetic(storage, f"{prefix}/data", 8, 8)
    summary = fit(TrainConfig(data=manifest, run=f"{prefix}/run", epochs=1, batch_size=4,
                              weights="none", use_gpu=True, covid_target=8), storage)
    assert summary["epochs"] == 1 and summary["final"]["train_images"] > 0


def test_scoring_sessions_run_on_cuda_where_onnxruntime_gpu_is_installed(trained_run, storage):
    import onnxruntime as ort

    from covidray.layout import RunLayout
    from covidray.onnx_model import onnx_session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    session = onnx_session(storage.read_bytes(RunLayout(trained_run["run"]).onnx), threads=1)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
