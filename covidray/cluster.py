"""Connecting to Ray and sizing work from what the cluster has.

Ray Train workers and Ray Data tasks share the cluster's CPUs. At default resources a
small cluster deadlocks (the workers hold every CPU and the read tasks never run), so
:func:`plan_resources` always leaves CPUs for the data pipeline. :func:`score_on_gpu` is
scoring's GPU policy (``--gpu``) against the cluster's resources.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from covidray.onnx_runtime import CUDA


@dataclass(frozen=True)
class ResourcePlan:
    workers: int
    worker_cpus: float  # CPUs reserved per Ray Train worker
    worker_gpus: float
    data_cpus: float  # CPUs per Ray Data map task / scoring actor
    torch_threads: int  # intra-op threads per training worker
    decode_cpus: float  # CPUs per scoring decode task (light: many run beside inference)
    inference_actor_cpus: float  # CPUs reserved per onnxruntime actor (not decode_cpus: no fusion)
    scoring_actors: int  # onnxruntime / backbone-feature actors
    inference_threads: int  # intra-op threads per onnxruntime / backbone-feature actor
    inference_gpus: float  # GPUs per onnxruntime / backbone-feature actor (0: on CPUs)
    inference_batch: int  # images per inference batch

    def to_dict(self) -> dict:
        return asdict(self)


def plan_resources(cluster: dict, workers: int = 1, use_gpu: bool = False) -> ResourcePlan:
    """Split ``cluster`` (``ray.cluster_resources()``) between training workers and data work.

    With ``use_gpu`` each training worker holds a GPU, and inference (scoring, backbone
    features) runs one actor per whole GPU with bigger batches, every CPU left to decoding.
    Inference on a GPU must reserve it: Ray then sets the actor's ``CUDA_VISIBLE_DEVICES`` to
    its own GPU, while an actor that reserves none sees every GPU of its node (Ray 2.60
    leaves the variable alone) and would crowd onto the first, outside Ray's accounting."""
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if use_gpu and gpus < workers:
        raise ValueError(f"--use-gpu with {workers} workers needs {workers} GPUs; the cluster "
                         f"has {gpus:g}. Lower --workers or drop --use-gpu")
    # Half the CPUs (at most one each) are reserved for training workers, the rest for the
    # Ray Data tasks feeding them. Reservations are logical: a worker's torch may still use
    # its share of the cores (decoding is light next to a ResNet step).
    worker_cpus = max(0.25, min(1.0, cpus / (2 * workers)))
    left_for_data = max(0.5, cpus - worker_cpus * workers)
    actors = max(1, math.floor(gpus if use_gpu else cpus / 2))
    return ResourcePlan(
        workers=workers,
        worker_cpus=round(worker_cpus, 3),
        worker_gpus=1.0 if use_gpu else 0.0,
        data_cpus=round(max(0.25, min(1.0, left_for_data / 2)), 3),
        torch_threads=max(1, math.floor(cpus / workers)),
        decode_cpus=0.5 if cpus >= 1 else 0.25,
        inference_actor_cpus=1.0 if cpus >= 2 else 0.5,
        scoring_actors=actors,
        # On a GPU the actor's CPU threads only feed it: the cores are decoding's.
        inference_threads=1 if use_gpu else max(1, math.floor(cpus / actors)),
        inference_gpus=1.0 if use_gpu else 0.0,
        inference_batch=128 if use_gpu else 32,
    )


def providers_on_gpu_nodes(ray, timeout: float = 60.0) -> list[str] | None:
    """onnxruntime's execution providers on a node that holds a GPU (the image there may
    differ from the driver's), asked by a task reserving 1% of a GPU; None when none ran it
    within ``timeout`` seconds."""
    @ray.remote(num_cpus=0, num_gpus=0.01)
    def providers() -> list[str]:
        import onnxruntime

        return onnxruntime.get_available_providers()

    probe = providers.remote()
    try:
        return ray.get(probe, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        return None


GPU_POLICIES = ("auto", "on", "off")


def score_on_gpu(policy: str, cluster: dict, gpu_node_providers) -> bool:
    """Whether scoring runs its onnxruntime actors on GPUs: ``policy`` (``--gpu``) against the
    cluster's resources and the onnxruntime of its GPU nodes. ``gpu_node_providers()`` asks
    one of them (the driver may run a CPU image beside GPU workers) and returns its
    onnxruntime's providers, or None when no GPU node answered (every GPU reserved)."""
    if policy not in GPU_POLICIES:
        raise ValueError(f"--gpu {policy}: expected one of {', '.join(GPU_POLICIES)}")
    gpus = float(cluster.get("GPU", 0.0))
    if policy == "off" or (policy == "auto" and gpus < 1):
        return False
    if gpus < 1:
        raise ValueError("--gpu on, but the Ray cluster has no GPU: add GPU nodes, or score "
                         "with --gpu auto or off")
    providers = gpu_node_providers()
    if providers is not None and CUDA in providers:
        return True
    why = ("no GPU node answered (are all its GPUs reserved?)" if providers is None else
           "onnxruntime on the GPU nodes has no CUDA provider (install onnxruntime-gpu: the "
           "GPU image has it)")
    if policy == "on":
        raise ValueError(f"--gpu on, but {why}")
    print(f"the cluster has {gpus:g} GPU(s), but {why}: scoring on CPUs (--gpu off says this "
          "is meant)", flush=True)
    return False


def alive_nodes(ray) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_object_storage(nodes: int, **locations: str | None) -> None:
    """On a cluster of several nodes every location a worker reads or writes must be object
    storage: a local path names a file on one machine only. ``locations`` maps option names
    (``data=...``) to their values; ``None`` and keywords without a slash are skipped."""
    if nodes < 2:
        return
    for name, value in locations.items():
        if value and "/" in value and not value.startswith("s3://"):
            option = name.replace("_", "-")
            raise ValueError(
                f"--{option} {value} is a local path, but this Ray cluster has {nodes} nodes: "
                "workers on the other nodes cannot see it. Put it in object storage "
                f"(--{option} s3://BUCKET/...) and run again")


def connect_ray(address: str | None = None):
    """Join the cluster at ``address`` / ``$RAY_ADDRESS`` (as under ``ray job submit``; ``auto``
    finds a ``ray start`` cluster on this machine), or start a private local instance when
    neither is set (never a stale cluster some earlier ``ray start`` left behind)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(address="local", logging_level="WARNING", include_dashboard=False)
    quiet_data_progress()
    return ray


def quiet_data_progress() -> None:
    """Ray Data's progress bars flood job logs; the stages print their own summaries."""
    from ray.data import DataContext

    import logging

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-execution chatter
    # ... nor the line saying that the bars are off (they are off on purpose).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
