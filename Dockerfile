# The three generators behind TorchServe, built from the committed checkpoints.
#   docker build -t generators . && docker run --rm -p 8080-8082:8080-8082 generators
FROM python:3.11-slim-bookworm

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv "$VENV" \
    && pip install --no-cache-dir -r /tmp/requirements.txt

RUN groupadd --gid 10001 serve && useradd --create-home --uid 10001 --gid 10001 serve
WORKDIR /app
COPY generators/ generators/
COPY handlers/ handlers/
COPY scripts/ scripts/
COPY checkpoints/ checkpoints/
COPY config.properties ./
RUN for model in diffusion ebm gan; do python scripts/archive.py "checkpoints/$model" --version 1.0; done \
    && chown -R serve:serve /app

USER 10001:10001
# Same config.properties as `make serve`; only the bind addresses change, through TorchServe's
# TS_<PROPERTY> environment overrides (enable_envvars_config=true), so the ports are reachable.
ENV TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_MANAGEMENT_ADDRESS=http://0.0.0.0:8081 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "scripts/client.py", "health"]
CMD ["scripts/serve.sh"]
