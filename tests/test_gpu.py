"""GPU paths: training with --use-gpu, and scoring on onnxruntime's CUDA provider in actors
that hold a GPU. They skip cleanly on machines without a GPU (this project's CI has none)."""

import pytest
import torch

from conftest import upload_synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def cuda_onnxruntime():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")


def test_training_with_use_gpu_trains_on_the_gpu(storage, ray_local, prefix):
    from covidray.stages.train import TrainConfig, fit

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray instance sees no GPU")
    manifest = upload_synthetic(storage, f"{prefix}/data", 8, 8)
    summary = fit(TrainConfig(data=manifest, run=f"{prefix}/run", epochs=1, batch_size=4,
                              weights="none", use_gpu=True, covid_target=8), storage)
    assert summary["epochs"] == 1 and summary["final"]["train_images"] > 0
    from covidray.layout import RunLayout

    placement = storage.read_json(RunLayout(f"{prefix}/run").placement)
    assert [p["device"].split(":")[0] for p in placement] == ["cuda"]  # not the CPU


def test_scoring_sessions_run_on_cuda_where_onnxruntime_gpu_is_installed(trained_run, storage):
    from covidray.layout import RunLayout
    from covidray.onnx_runtime import onnx_session

    cuda_onnxruntime()
    session = onnx_session(storage.read_bytes(RunLayout(trained_run["run"]).onnx), 1, gpu=True)
    assert session.get_providers()[0] == "CUDAExecutionProvider"


def test_scoring_on_the_gpu_gives_the_cpu_scores(trained_run, storage, ray_local, prefix,
                                                 capsys):
    from covidray.layout import RunLayout, ScoreLayout
    from covidray.stages.score import ScoreConfig, score_archive

    cuda_onnxruntime()
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray instance sees no GPU")
    model, archive = RunLayout(trained_run["run"]).onnx, trained_run["manifest"]
    runs = {}
    for gpu in ("off", "on"):
        summary = score_archive(ScoreConfig(archive, model, f"{prefix}/{gpu}", gpu=gpu), storage)
        assert summary["scored"] == summary["listed"] > 0
        runs[gpu] = (storage.read_parquet_dir(ScoreLayout(f"{prefix}/{gpu}").predictions)
                     .sort_values("uri").reset_index(drop=True))
    assert "each on a GPU, batches of 128" in capsys.readouterr().out
    assert list(runs["on"]["uri"]) == list(runs["off"]["uri"])
    difference = (runs["on"]["score"] - runs["off"]["score"]).abs().max()
    print(f"largest |GPU - CPU| score difference: {difference:.2e}")
    assert difference < 2e-3  # onnxruntime's CUDA convolutions may use TF32
