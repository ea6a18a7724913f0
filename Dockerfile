# One image for every sharedsync component (CSI plugin, agent, operator).
#
#   docker build -t sharedsync:0.1.0 .
#
# Stage 1 builds the wheel; stage 2 is the runtime: a venv with the wheel, plus the storage
# tools the node side runs (btrfs-progs, util-linux, e2fsprogs, fuse3). No compiler reaches
# the final image. The node plugin and the agent run privileged through the chart; the
# controller and the operator run as the unprivileged user created here.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sharedsync sharedsync
COPY csi_driver csi_driver
COPY replication_agent replication_agent
RUN python -m pip install --no-cache-dir --upgrade "pip>=25.1" build \
 && python -m build --wheel --outdir /wheels .

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sharedsync" \
      org.opencontainers.image.description="Replicated shared persistent volumes for Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      btrfs-progs e2fsprogs util-linux mount fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN python -m venv /opt/sharedsync \
 && /opt/sharedsync/bin/pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home sharedsync
ENV PATH=/opt/sharedsync/bin:$PATH
USER 10001
ENTRYPOINT ["sharedsync-csi"]
