# CPU image that runs covidray's jobs on a Ray cluster (KubeRay head and workers, or `ray start`).
#   docker build -t covidray:0.1.0 .
# For GPU workers, build FROM rayproject/ray:2.60.0-py311-gpu and drop the CPU index below.
FROM rayproject/ray:2.60.0-py311-cpu

WORKDIR /home/ray/covidray
# torch/torchvision first, from PyTorch's CPU index (the PyPI default is a multi-GB CUDA build).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY covidray ./covidray
COPY jobs ./jobs
RUN pip install --no-cache-dir . \
 && python -c "import covidray.cli, onnxruntime, Augmentor, boto3"

# Jobs submitted with --working-dir ship their own code; this copy serves clusters that run
# the image's jobs directly (entrypoint: python /home/ray/covidray/jobs/score.py ...).
ENV AWS_EC2_METADATA_DISABLED=false \
    PYTHONUNBUFFERED=1
