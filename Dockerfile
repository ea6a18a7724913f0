# One image for every sharedsync component: the CSI plugin (sharedsync-csi), the replication
# agent (sharedsync-agent) and the operator (sharedsync-operator); the chart picks the command.
#
#   scripts/build-image     docker, podman or buildah when one works; else the same image from
#                           a Debian rootfs (mmdebstrap), with no container engine at all
#   docker build --build-arg VERSION=0.1.0 -t localhost/sharedsync:0.1.0 .
#
# Stage "build" turns the source into wheels and installs them into a venv at /opt/sharedsync.
# The runtime stage is the same Python base plus the storage tools listed in
# packaging/runtime-packages.txt, the one list of Debian packages: scripts/build-image reads that
# file too, and takes this stage's LABEL, ENV, USER and CMD from here, so both ways give the same
# image. No compiler, build tool or wheel cache reaches the runtime stage.
#
# The default user is the unprivileged sharedsync (65532, numeric so that runAsNonRoot can be
# verified): the operator and the CSI controller need nothing more. The node DaemonSet runs the
# node plugin and the agent as root, privileged (loop devices, mounts, FUSE).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sharedsync sharedsync
COPY csi_driver csi_driver
COPY replication_agent replication_agent
COPY operator operator
RUN python -m pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/sharedsync \
 && /opt/sharedsync/bin/pip install --no-index --find-links /wheels sharedsync

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sharedsync" \
      org.opencontainers.image.description="Replicated shared persistent volumes for Kubernetes, built from node-local disks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/sharedsync/sharedsync" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY packaging/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && sed 's/#.*//' /tmp/runtime-packages.txt \
    | DEBIAN_FRONTEND=noninteractive xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --gid 65532 sharedsync \
 && useradd --uid 65532 --gid 65532 --create-home --home-dir /home/sharedsync \
      --shell /usr/sbin/nologin sharedsync
COPY --from=build /opt/sharedsync /opt/sharedsync
ENV PATH=/opt/sharedsync/bin:$PATH PYTHONUNBUFFERED=1
USER 65532:65532
CMD ["sharedsync-operator", "--help"]
