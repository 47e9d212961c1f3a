FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sandqueue ./sandqueue
COPY producer ./producer
COPY worker ./worker
RUN pip install ".[monitor,otlp]" && useradd --create-home --uid 10001 sandqueue
USER sandqueue
CMD ["sandqueue", "worker"]
