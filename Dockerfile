FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sandqueue ./sandqueue
COPY producer ./producer
COPY worker ./worker
# git: simulated sandboxes clone a task's `repo` on the worker itself (real ones in E2B).
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
RUN pip install ".[monitor,s3]" && useradd --create-home --uid 10001 sandqueue \
    && mkdir /artifacts && chown sandqueue /artifacts
USER sandqueue
CMD ["sandqueue", "worker"]
