# The flexai image: one image for the Kubernetes node agent, the scheduler extender and the admission
# webhook (`flexai k8s agent|scheduler|webhook`), and for `flexai serve` in a container.
#
#   docker build -t flexai:0.1.0 .
#   docker build --build-arg EXTRAS= -t flexai:0.1.0 .     # without the NVIDIA (NVML) bindings
#
# The NVIDIA driver is not in the image: on GPU nodes the NVIDIA container toolkit mounts it
# (see docs/kubernetes.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# Optional dependency groups of pyproject.toml to install (comma-separated); "nvidia" adds NVML.
ARG EXTRAS=nvidia

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
RUN if [ -n "$EXTRAS" ]; then pip install "./[$EXTRAS]"; else pip install .; fi \
    && rm -rf /build \
    && flexai --help > /dev/null

WORKDIR /
ENTRYPOINT ["flexai"]
CMD ["--help"]
