# The Infinite-ID app on an NVIDIA GPU.
#   docker build -t infinite-id .
#   docker run --gpus all -p 7860:7860 -v hf-cache:/home/user/.cache infinite-id            # the real model
#   docker run --gpus all -p 7860:7860 infinite-id --engine tiny                            # flags go to app.py
# Dependencies come from the same requirements.txt as `make run` (torch's wheels bring their own CUDA libraries;
# the base image supplies the CUDA/cuDNN runtime the NVIDIA container toolkit expects).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.11 (the version the project is tested with) from deadsnakes; compilers only in this stage, for any
# dependency that ships as source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# libgl1 and libglib2.0-0: OpenCV (insightface's image ops) needs them at import.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 libgl1 libglib2.0-0 \
 && apt-get purge -y software-properties-common gpg-agent \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv

# A non-root user; its cache folder is a volume so downloaded weights (Hugging Face hub cache and the insightface
# face models) survive container restarts and upgrades.
RUN useradd --create-home --uid 1000 user \
 && mkdir -p /home/user/.cache/huggingface /home/user/.cache/insightface \
 && chown -R user:user /home/user/.cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/user/.cache/huggingface \
    INFINITE_ID_FACE_ROOT=/home/user/.cache/insightface \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
VOLUME /home/user/.cache
USER user
WORKDIR /home/user/app
COPY --chown=user:user . .

EXPOSE 7860
# The first start downloads the weights (several GB) before the server answers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"
ENTRYPOINT ["python", "app.py"]
CMD []
