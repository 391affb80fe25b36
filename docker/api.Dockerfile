# The API (and the one-shot migration): FastAPI + SQLAlchemy, no torch.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv
COPY docker/requirements-api.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && useradd --system --uid 10001 cnc
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
USER cnc
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", \
     "--proxy-headers"]
