"""Running an exported model: :class:`OnnxScorer`, the one onnxruntime scorer (scoring's
Ray Data callable, and the driver's passes in export, evaluate and the benchmarks).

The graph maps ``input`` ``float32[N,3,224,224]`` (the output of the model's
:class:`~covidray.imaging.recipe.Recipe`) to ``logits`` and ``probabilities`` ``[N, 2]``;
its metadata (written by :mod:`covidray.onnx_export`) names the classes, the recipe and the
training, so a scorer needs nothing else. torch is never imported here for scoring: an
actor runs onnxruntime alone (a GPU session imports torch only for its CUDA libraries).
"""

from __future__ import annotations

import json

import numpy as np

from covidray.imaging.recipe import RECIPE_NAME, Recipe, model_inputs
from covidray.metrics import calibrated, predicted_labels

META_PREFIX = "covidray."
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
    ``probability`` (under a site card's ``calibration`` map; NaN without one),
    ``prediction`` and ``threshold``. On the driver: :meth:`scores` of ``uint8`` pixels,
    :meth:`scores_and_features`, :meth:`probabilities` of model inputs."""

    def __init__(self, model: bytes, name: str, threshold: float | None = None,
                 threads: int = 0, keep: tuple[str, ...] = (), gpu: bool = False,
                 features: bool = False, calibration: dict | None = None):
        self.session = onnx_session(with_features_output(model) if features else model,
                                    threads, gpu)
        self.metadata = read_metadata(self.session)
        self.recipe = check_recipe(self.metadata, name)
        self.threshold = threshold  # chosen by covidray.model_card.scoring_threshold
        self.positive = positive_index(self.metadata)
        self.keep = keep
        self.features = features
        self.calibration = calibration  # a site card's map: the probability column

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
                "probability": calibrated(self.calibration, scores),
                "prediction": prediction.astype(object),
                "threshold": np.full(len(ok), self.threshold), "error": batch["error"]}
