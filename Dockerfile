# dicomrouter in a container: docs/deployment.md (build, run, configure, reload).
#   docker build -t dicomrouter .
#   docker run -p 11112:11112 -p 8080:8080 -v dicomrouter-data:/var/lib/dicomrouter dicomrouter
# Debian 12's Python, in a virtual environment: the same path as the README's.
FROM debian:12-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/dicomrouter
COPY pyproject.toml README.md /tmp/dicomrouter/
COPY src /tmp/dicomrouter/src
RUN /opt/dicomrouter/bin/pip install --no-cache-dir --disable-pip-version-check /tmp/dicomrouter \
 && rm -rf /tmp/dicomrouter

# A dedicated user with a fixed uid, so that a host folder mounted on
# /etc/dicomrouter can be given to it (chown 10001).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dicomrouter \
      --shell /usr/sbin/nologin dicomrouter \
 && install -d -o dicomrouter -g dicomrouter -m 0700 /var/lib/dicomrouter /etc/dicomrouter

# The received objects and the index: keep them on a volume.
ENV DICOMROUTER_STORAGE__PATH=/var/lib/dicomrouter \
    PATH=/opt/dicomrouter/bin:$PATH \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/dicomrouter
# DICOM (dicom.port) and the dashboard, REST API and metrics (http.port).
EXPOSE 11112 8080

USER dicomrouter
# `serve` runs on ./dicomrouter.yaml when there is one, here a file in the folder
# mounted on /etc/dicomrouter (`init` writes it), else on the embedded defaults.
WORKDIR /etc/dicomrouter

# /readyz: the receiver and the dispatcher run (open without login unless
# http.open_probes is false; plain HTTP: with http.tls, change the URL).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DICOMROUTER_HTTP__PORT', '8080'), timeout=8)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["dicomrouter"]
CMD ["serve"]
