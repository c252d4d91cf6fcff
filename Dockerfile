# The three generators behind TorchServe, built from the committed checkpoints.
#   DOCKER_BUILDKIT=1 docker build -t generators . && docker run --rm -p 8080-8082:8080-8082 generators
# Air-gapped, without a registry: scripts/build_image.sh (a debootstrap base, pip through build secrets).
# No `# syntax=` line on purpose: it would make BuildKit pull its Dockerfile frontend from a registry.
#
# Build arguments:
#   BASE_IMAGE       a Debian bookworm image (apt installs Python 3.11 and Java 17 from its sources)
#   TORCH_INDEX_URL  where torch/torchvision come from, e.g. https://download.pytorch.org/whl/cpu for the
#                    small CPU-only wheels; empty (the default) means pip's index, whose torch pulls ~2.8 GB of CUDA
# Build secrets (optional, never stored in a layer):
#   pip_conf         a pip configuration file (index URLs, possibly with credentials)
#   ca_bundle        the CA bundle pip verifies its index against
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
ARG TORCH_INDEX_URL=
# The secrets are tmpfs mounts of this one step; PIP_CONFIG_FILE/PIP_CERT are set only inside it.
# hadolint ignore=SC2046
RUN --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    --mount=type=secret,id=pip_conf \
    --mount=type=secret,id=ca_bundle \
    python3 -m venv "$VENV" \
    && export PIP_CONFIG_FILE=/run/secrets/pip_conf PIP_NO_CACHE_DIR=1 \
    && if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" $(grep -E '^torch(vision)?==' /tmp/requirements.txt); \
    fi \
    && pip install -r /tmp/requirements.txt

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
