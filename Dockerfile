# syntax=docker/dockerfile:1
# cxr-triage image: one image for `cxr node`, `cxr worker`, `cxr run` and the admin CLI.
# Research use only, not for diagnostic use.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: wheels into a venv
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cxr ./cxr
COPY db ./db
COPY dicom_node ./dicom_node
COPY worker ./worker
COPY ml ./ml
COPY web ./web
COPY apps ./apps
RUN pip install --upgrade pip setuptools wheel \
 && pip install . \
 && python -c "import cxr, dicom_node, worker, ml, db, web, apps; print('cxr-triage installed')"

# ---------------------------------------------------------------- runtime: no compilers, non-root
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="cxr-triage" \
      org.opencontainers.image.description="Chest X-ray triage worker beside the PACS. RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /var/lib/cxr --create-home --shell /usr/sbin/nologin cxr \
 && install -d -o cxr -g cxr /var/lib/cxr/spool /var/lib/cxr/model-cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CXR_SPOOL_DIR=/var/lib/cxr/spool \
    CXR_MODEL_CACHE_DIR=/var/lib/cxr/model-cache \
    CXR_DATABASE_URL=sqlite:////var/lib/cxr/cxr.db \
    CXR_EMBEDDED_BROKER_PATH=/var/lib/cxr/broker.sqlite \
    CXR_METRICS_HOST=0.0.0.0
WORKDIR /var/lib/cxr
USER cxr:cxr
EXPOSE 11112 9108
VOLUME ["/var/lib/cxr/spool"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CXR_METRICS_PORT', '9108'), timeout=5)"]
# tini forwards SIGTERM to cxr, which shuts down warmly (work in flight finishes)
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["cxr", "run"]
