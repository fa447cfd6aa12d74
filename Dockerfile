# syntax=docker/dockerfile:1
# NTONIX gateway image; the bundled mock LLM backend runs from the same image.
#
#   docker build -t ntonix .
#   docker run --rm -p 8080:8080 -e NTONIX_BACKENDS=10.0.0.5:8000,10.0.0.6:8000 ntonix
#   docker run --rm -p 8001:8001 -e HEALTHCHECK_URL=http://127.0.0.1:8001/health \
#       ntonix python -m mock_llm --host 0.0.0.0 --port 8001
#
# HTTPS: mount a certificate and key and name them, e.g.
#   -v "$PWD/certs:/certs:ro" -e NTONIX_SSL_PORT=8443 -p 8443:8443 \
#   -e NTONIX_SSL_CERT_FILE=/certs/server.crt -e NTONIX_SSL_KEY_FILE=/certs/server.key
# Everything else is configured as on a host: conf/ntonix.json (or NTONIX_CONFIG) and NTONIX_*
# variables; see docs/configuration.md.

# ---------------------------------------------------------------- build: wheels only
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.txt .
# Every dependency ships a manylinux wheel or is pure Python, so no compiler is needed.
RUN pip wheel --no-cache-dir --disable-pip-version-check -r requirements.txt -w /wheels

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim
LABEL org.opencontainers.image.title="NTONIX" \
      org.opencontainers.image.description="Gateway for local OpenAI-compatible LLM servers"

# The wheels are bind-mounted from the build stage (BuildKit), so no layer keeps a copy.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore --no-index --find-links=/wheels \
        -r /tmp/requirements.txt \
    && useradd --system --no-log-init --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin ntonix

WORKDIR /app
COPY --chown=root:root gunicorn.conf.py ./
COPY --chown=root:root conf/ ./conf/
COPY --chown=root:root ntonix/ ./ntonix/
COPY --chown=root:root mock_llm/ ./mock_llm/

# No certificate in the image: HTTPS stays off until one is mounted (see above).
# PYTHONUNBUFFERED: log lines reach `docker logs` at once.
ENV NTONIX_SSL_PORT=0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
EXPOSE 8080 8443

# curl is not in the slim image; Python is. 503 (no healthy backend) counts as unhealthy.
# HEALTHCHECK_URL lets a container running another command (the mock) check itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:%s/health' % os.environ.get('NTONIX_PORT', '8080'), timeout=2)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "ntonix.wsgi"]
