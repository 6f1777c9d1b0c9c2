# The operator image: `forge operator` (kopf, the Kubernetes client, the API
# models); no torch, no trainer dependencies. The Helm chart in helm/forge runs it.
#
#   docker build -t registry.internal/forge/forge-operator:0.1.0 .
#
# Dependencies are pinned to the versions the tests ran with: requirements/dev.lock
# is passed as a constraints file, so only the operator's share of it is installed.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY requirements/dev.lock requirements/dev.lock
COPY operator/ operator/
# the operator imports forge_trainer.config and .contract (plain Python, no torch) to translate specs
COPY trainer-image/forge_trainer/ trainer-image/forge_trainer/
RUN python -m venv /opt/forge \
 && /opt/forge/bin/pip install --constraint requirements/dev.lock ".[operator]"

FROM python:3.12-slim
COPY --from=build /opt/forge /opt/forge
ENV PATH=/opt/forge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A numeric user, so that the kubelet can verify runAsNonRoot (the chart runs it as 10001).
RUN groupadd --system --gid 10001 forge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin forge
USER 10001:10001
# 8000: Prometheus metrics (FORGE_METRICS_PORT); 8080: kopf's /healthz (FORGE_HEALTH_ENDPOINT)
EXPOSE 8000 8080
ENTRYPOINT ["forge", "operator"]
