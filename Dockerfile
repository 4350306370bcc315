# chatglm-gateway image. Build args:
#   TORCH_SPEC   which torch to install first (pin it: an unpinned torch resolves to a large CUDA build)
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL   standard pip variables, e.g. to take a CPU-only torch wheel
#   EXTRAS       optional extras of the package, e.g. "ray" for `serve --ray` (deploy/)
FROM python:3.11-slim
ARG TORCH_SPEC=torch==2.13.0
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CHATGLM_GATEWAY_CACHE=/cache
WORKDIR /app
# A C compiler for the native CPU kernels (adapters/weights/native, built on first use; without one the
# gateway falls back to torch's kernels, ~1.5-2x slower for int4 decoding).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY gateway ./gateway
RUN pip install --no-cache-dir ."${EXTRAS:+[$EXTRAS]}"
RUN useradd --create-home --uid 1000 gateway && mkdir -p /cache && chown gateway /cache
USER gateway
# Build the kernels into the image's cache now (a mounted /cache rebuilds them in about a second).
RUN python -c "from adapters.weights import native; native.library()"
EXPOSE 8000
# Inside a container the server must listen on all interfaces to be reachable through the port map.
ENTRYPOINT ["chatglm-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
