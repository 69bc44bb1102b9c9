# The orchestrate image used by the CronJob and the webhook Deployment.
# It carries pg_dump/pg_restore/psql 18 (pgtools extra), which can dump any server up
# to PostgreSQL 18, so the image does not depend on the cluster's PostgreSQL version.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
RUN pip install --no-cache-dir --prefix=/install ".[pgtools]"

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin orchestrate
COPY --from=build /install /usr/local
# JSON logs (the CLI also detects Kubernetes by itself) and no .pyc writes on a
# read-only root filesystem.
ENV ORCHESTRATE_LOG_FORMAT=json PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT ["orchestrate"]
CMD ["--help"]
