# Chorus server image. Build: docker build -t chorus .
FROM python:3.11-slim-bookworm

RUN useradd --system --create-home chorus
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sfu sfu
COPY signaling signaling
COPY turn turn
COPY web web
COPY bench bench
COPY egress egress
COPY ingest ingest
RUN pip install --no-cache-dir .

USER chorus
ENV CHORUS_HOST=0.0.0.0 \
    CHORUS_PORT=8080
EXPOSE 8080
# SIGTERM drains (participants move or finish, up to drain_timeout), then Chorus exits 0: give it longer than
# drain_timeout (docker stop -t, compose stop_grace_period). A second SIGTERM stops it at once (status 143).
STOPSIGNAL SIGTERM
# Liveness over whatever the settings say (HTTPS when tls_cert is set, the configured port).
HEALTHCHECK --interval=10s --timeout=3s CMD ["chorus", "health"]
ENTRYPOINT ["chorus"]
CMD ["serve"]
