"""The ONNX model: writing it (one self-contained file, dynamic batch, metadata inside),
checking it against torch, and running it (:class:`OnnxScorer`, the scoring callable).

The exported graph maps ``input`` ``float32[N,3,224,224]`` (the output of the model's
:class:`covidray.images.Recipe`) to ``logits`` and ``probabilities`` ``[N, 2]``.
Its metadata carries class names, the preprocessing recipe, the operating threshold,
the backbone and its starting weights (source, sha256, licence) and the training config,
so a scorer needs nothing else.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from covidray.images import INPUT_SIZE, PAPER_RECIPE, RECIPE_NAME, Recipe, model_inputs
from covidray.labels import LABELS, POSITIVE_LABEL
from covidray.metrics import predicted_labels

# torch is imported only by the functions that export or compare with it: a scoring actor
# runs onnxruntime alone and starts without loading torch.

PARITY_TOLERANCE = 1e-4
META_PREFIX = "covidray."


class ExportParityError(RuntimeError):
    """onnxruntime disagrees with torch by more than the tolerance."""


def model_metadata(threshold: float, weights: str, train_config: dict, epochs: int,
                   recipe: Recipe = PAPER_RECIPE, provenance: dict | None = None) -> dict:
    """The ONNX metadata (``covidray.*``). ``weights``: one line naming the starting
    weights; ``provenance``: :func:`covidray.model.weights_provenance` (older checkpoints
    have none: their backbone is ResNet18)."""
    provenance = provenance or {}
    return {
        "class_names": json.dumps(list(LABELS)),
        "positive_class": POSITIVE_LABEL,
        "preprocessing": json.dumps(recipe.describe(), sort_keys=True),
        "backbone": provenance.get("backbone", train_config.get("backbone", "resnet18")),
        "weights_source": provenance.get("source", weights),
        "weights_sha256": provenance.get("sha256", ""),
        "weights_licence": provenance.get("licence", ""),
        "threshold": repr(float(threshold)),
        "weights": weights,
        "epochs_trained": str(epochs),
        "train_config": json.dumps(train_config, sort_keys=True, default=str),
        "positive_rule": "probabilities[:, positive_class] >= threshold",
    }


def export_onnx(model, metadata: dict) -> bytes:
    """Serialise ``model`` (eval mode) to ONNX bytes with ``metadata`` in ``metadata_props``."""
    import torch

    from covidray.model import ScoringModel

    wrapper = ScoringModel(model.eval()).eval()
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, verbose=False,
            input_names=["input"], output_names=["logits", "probabilities"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, str(value)
    return proto.SerializeToString()


def quantize_int8(model_bytes: bytes, calibration: np.ndarray, batch: int = 16) -> bytes:
    """onnxruntime static quantization: QDQ, int8 weights per channel, uint8 activations,
    calibrated on ``calibration`` (``float32[N, 3, 224, 224]``, the recipe's inputs). The
    covidray metadata is kept, with ``quantization`` added."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + batch]}
                                 for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    source_proto = onnx.load_from_string(model_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = (os.path.join(tmp, name) for name in
                                    ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(source, "wb") as fh:
            fh.write(model_bytes)
        quant_pre_process(source, prepared)
        quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
        proto = onnx.load(target)
    del proto.metadata_props[:]
    for entry in source_proto.metadata_props:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    proto.metadata_props.add(key=META_PREFIX + "quantization",
                             value=f"int8 static (QDQ), calibrated on {len(calibration)} "
                                   "validation images")
    return proto.SerializeToString()


FEATURES_OUTPUT = "features"


def with_features_output(model_bytes: bytes) -> bytes:
    """The exported model with one more output, ``features`` ``[N, width]``: the input of its
    last layer (the ``Gemm`` that makes ``logits``, in float or int8 exports). One
    onnxruntime pass then gives the scores and what the last layer reads (the shortcut
    audit's features)."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    producer = {output: node for node in proto.graph.node for output in node.output}
    last = producer["logits"]
    while last.op_type in ("QuantizeLinear", "DequantizeLinear") and last.input[0] in producer:
        last = producer[last.input[0]]  # an int8 (QDQ) export wraps the Gemm's output
    if last.op_type != "Gemm":
        raise ValueError(f"the model's logits come from a {last.op_type}, not the Gemm of its "
                         "last layer: re-export it with `covidray export`")
    identity = onnx.helper.make_node("Identity", [last.input[0]], [FEATURES_OUTPUT])
    proto.graph.node.append(identity)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(
        FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString()


def positive_index(metadata: dict) -> int:
    """Where the positive class is in the model's ``probabilities``."""
    return json.loads(metadata["class_names"]).index(metadata["positive_class"])


def read_metadata(session) -> dict:
    """The covidray metadata of an onnxruntime session, prefix stripped."""
    raw = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX)}


GPU_POLICIES = ("auto", "on", "off")
CUDA = "CUDAExecutionProvider"


def onnx_session(model_bytes: bytes, threads: int = 0, gpu: bool = False):
    """An onnxruntime session on the CPU, or with ``gpu`` on CUDA (onnxruntime-gpu); a GPU
    session that onnxruntime could not put on CUDA fails here rather than run on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: they share the cores with decoding.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [CUDA, "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    if gpu:
        if CUDA not in ort.get_available_providers():
            raise RuntimeError("scoring on a GPU needs onnxruntime-gpu, but this node's "
                               f"onnxruntime offers only {ort.get_available_providers()}: "
                               "install onnxruntime-gpu (the GPU image has it) or score with "
                               "--gpu off")
        import torch  # noqa: F401 - loads the CUDA and cuDNN of torch's wheels, which
        # onnxruntime-gpu then uses (one set of CUDA libraries in the image)

        if hasattr(ort, "preload_dlls"):  # and those of the nvidia-* wheels torch did not
            ort.preload_dlls()
    session = ort.InferenceSession(model_bytes, options, providers=providers)
    if gpu and session.get_providers()[0] != CUDA:
        raise RuntimeError("onnxruntime-gpu could not start CUDA on this node "
                           f"({cuda_mismatch() or 'see its log above'}): fix the image or "
                           "score with --gpu off")
    return session


def cuda_mismatch() -> str | None:
    """Why onnxruntime-gpu cannot use the CUDA libraries torch brings, else None. It loads
    them from torch's wheels, so the two must be built for one CUDA major (PyPI's torch
    2.14.1 and onnxruntime-gpu 1.31.1 both are for CUDA 13). The GPU image checks this."""
    import torch

    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return "this onnxruntime is not onnxruntime-gpu"
    if not torch.version.cuda:
        return f"torch here is a CPU build; onnxruntime-gpu needs CUDA {cuda_version}"
    if cuda_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"onnxruntime-gpu is built for CUDA {cuda_version}, torch here for CUDA "
                f"{torch.version.cuda}: install a pair built for one CUDA major")
    return None


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


def parity_check(model, model_bytes: bytes, inputs: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict:
    """Run ``inputs`` through torch and onnxruntime; raise if they differ by more than ``tolerance``."""
    import torch

    from covidray.model import ScoringModel

    wrapper = ScoringModel(model.eval()).eval()
    with torch.inference_mode():
        torch_logits, torch_probs = (t.numpy() for t in wrapper(torch.from_numpy(inputs)))
    ort_logits, ort_probs = onnx_session(model_bytes).run(None, {"input": inputs})
    report = {"images": int(len(inputs)),
              "max_abs_diff_logits": float(np.max(np.abs(torch_logits - ort_logits))),
              "max_abs_diff_probabilities": float(np.max(np.abs(torch_probs - ort_probs))),
              "tolerance": tolerance}
    worst = max(report["max_abs_diff_logits"], report["max_abs_diff_probabilities"])
    report["passed"] = bool(worst <= tolerance)
    if not report["passed"]:
        raise ExportParityError(f"onnxruntime differs from torch by {worst:.3g} "
                                f"(> {tolerance:g}) on {len(inputs)} images")
    return report


def check_recipe(metadata: dict, model_uri: str) -> Recipe:
    """The preprocessing recipe a model's metadata names; refuses one this library cannot
    apply (another recipe family, or a window it does not know)."""
    if "preprocessing" not in metadata:
        raise ValueError(f"'{model_uri}' has no covidray metadata: export it with `covidray export`")
    described = json.loads(metadata["preprocessing"])
    if described.get("name") != RECIPE_NAME:
        raise ValueError(f"'{model_uri}' was trained with preprocessing {metadata['preprocessing']}"
                         f", this covidray uses {RECIPE_NAME}: re-export or upgrade")
    return Recipe.from_description(described, model_uri)


class OnnxScorer:
    """The one onnxruntime scorer of an exported model. ``model`` is the ONNX file's bytes
    (the driver reads it once; Ray hands them to every actor, so an actor never waits on
    storage) and ``name`` where it came from; a model of another preprocessing recipe is
    refused. With ``features`` the session also returns the last layer's input
    (:func:`with_features_output`: the shortcut audit's features) from the same pass.

    As a Ray Data callable (``__call__``): loaded batch -> the same rows with ``score``,
    ``prediction`` and ``threshold``. On the driver: :meth:`scores` of ``uint8`` pixels,
    :meth:`scores_and_features`, :meth:`probabilities` of model inputs."""

    def __init__(self, model: bytes, name: str, threshold: float | None = None,
                 threads: int = 0, keep: tuple[str, ...] = (), gpu: bool = False,
                 features: bool = False):
        self.session = onnx_session(with_features_output(model) if features else model,
                                    threads, gpu)
        self.metadata = read_metadata(self.session)
        self.recipe = check_recipe(self.metadata, name)
        self.threshold = threshold  # chosen by covidray.model_card.scoring_threshold
        self.positive = positive_index(self.metadata)
        self.keep = keep
        self.features = features

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """COVID probabilities of model inputs ``float32[N, 3, 224, 224]``."""
        return self.session.run(["probabilities"], {"input": inputs})[0][:, self.positive]

    def scores_and_features(self, pixels: np.ndarray, batch: int = 64
                            ) -> tuple[np.ndarray, np.ndarray]:
        """``uint8[N, 224, 224]`` pixels -> (COVID probabilities, the last layer's input
        features), ``batch`` images per onnxruntime run; needs ``features``."""
        outputs = [self.session.run(["probabilities", FEATURES_OUTPUT],
                                    {"input": self.recipe.normalize(pixels[i:i + batch])})
                   for i in range(0, len(pixels), batch)]
        if not outputs:
            return np.zeros(0), np.zeros((0, 0), np.float32)
        return (np.concatenate([o[0] for o in outputs])[:, self.positive],
                np.concatenate([o[1] for o in outputs]))

    def scores(self, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
        """``uint8[N, 224, 224]`` pixels -> COVID probabilities, ``batch`` images a run."""
        parts = [self.probabilities(self.recipe.normalize(pixels[i:i + batch]))
                 for i in range(0, len(pixels), batch)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def __call__(self, batch: dict) -> dict:
        if self.threshold is None:
            raise ValueError("an OnnxScorer that predicts needs its threshold")
        inputs, ok = model_inputs(batch, self.recipe)
        scores = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            scores[ok] = self.probabilities(inputs)
        predicted = predicted_labels(np.nan_to_num(scores, nan=-1.0), self.threshold)
        prediction = np.where(ok, predicted, None)
        return {**{c: batch[c] for c in self.keep}, "target": batch["target"], "score": scores,
                "prediction": prediction.astype(object),
                "threshold": np.full(len(ok), self.threshold), "error": batch["error"]}
