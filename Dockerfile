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
RUN pip install --no-cache-dir .

USER chorus
ENV CHORUS_HOST=0.0.0.0 \
    CHORUS_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["chorus"]
CMD ["serve"]
