# A GPU worker: CUDA torch + the library + the shared DB/queue code. One job at a time;
# run one container per GPU (docker compose up --scale worker=N).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
WORKDIR /srv
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY docker/requirements-worker.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt && useradd --system --uid 10001 cnc
COPY app ./app
COPY worker ./worker
COPY cnc_core ./cnc_core
USER cnc
HEALTHCHECK --interval=30s --timeout=10s --retries=3 \
  CMD celery -A worker.celery_app inspect ping -d "celery@$HOSTNAME" --timeout 5 || exit 1
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", \
     "-Q", "cnc.jobs,cnc.light", "--loglevel=INFO", "-n", "worker@%h"]
