# The ion-sidecar image: `docker build -t ion-sidecar .` then `docker run ion-sidecar --context.eventid=...`.
# Flags are arguments (see `docker run --rm ion-sidecar --help`); SHARED_SECRET may come from the environment.
# A pinned release of the base image (tests/users/test_compose.py checks every image reference).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed non-root uid/gid, so a volume shared with the module's container can be owned by it, and
# so Kubernetes' runAsNonRoot can verify the numeric USER below.
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/sidecar --create-home sidecar \
 && mkdir -p /ion /var/lib/sidecar \
 && chown 10001:10001 /ion /var/lib/sidecar

# The dependencies first, in their own layer, at the exact versions tested: requirements.lock is
# exported from uv.lock (scripts/lock) and every file is checked against its hash. A change to the
# code alone reuses this layer.
WORKDIR /opt/sidecar
COPY requirements.lock ./
RUN pip install --no-deps --require-hashes -r requirements.lock

# Then the sidecar itself: a regular (not editable) install into site-packages, without touching the
# dependencies above. The Hydra config folder conf/ is not part of the wheel, so SIDECAR_CONFIG_DIR
# tells sidecar/cli.py:config_dir() where it is.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY flows ./flows
COPY dispatcher ./dispatcher
# The module authors' client (its own distribution, which the sidecar imports for the folder layout and
# the shared-secret rule; the compose `module` service runs examples/ on it).
COPY client ./client
RUN pip install --no-deps . ./client && pip check && rm -rf build *.egg-info client/build client/*.egg-info
COPY conf ./conf
COPY examples ./examples

# PREFECT_HOME: Prefect's own files (the image never starts a Prefect server of its own: the entry
# point refuses the development fallback, so PREFECT_API_URL must name one). SIDECAR_PORT: the port
# the health check probes; keep it equal to --serverport.
ENV SIDECAR_CONFIG_DIR=/opt/sidecar/conf \
    PREFECT_HOME=/var/lib/sidecar/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    SIDECAR_PORT=8080

USER 10001:10001
# Development mode keeps its data plane in ./.dev, so the working directory must be writable.
WORKDIR /var/lib/sidecar
VOLUME ["/ion"]
EXPOSE 8080

# /healthz answers 200 once the Prefect API is usable and needs no secret; the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_PORT', '8080'), timeout=4)"]

# Inside a container the loopback address is unreachable from the module's container, so bind all
# addresses of the container's own network; a later --host on the command line still wins.
ENTRYPOINT ["sidecar", "--host=0.0.0.0", "--requireprefectapi=true"]
CMD ["--help"]
