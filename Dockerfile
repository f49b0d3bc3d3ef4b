# One image for every service (worker, API, app, scheduler, producer); the command picks the role.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FRAUD_HOME=/app FRAUD_DATA_DIR=/data FRAUD_RUNS_DIR=/data/runs
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml requirements.lock README.md settings.ini ./
COPY fraud_detection ./fraud_detection
RUN pip install --no-cache-dir -c requirements.lock . && python -m ipykernel install --sys-prefix --name python3
COPY feature_repo ./feature_repo
COPY scheduled ./scheduled
RUN useradd --create-home --uid 10001 fraud && mkdir -p /data && chown fraud /data
USER fraud
VOLUME ["/data"]
EXPOSE 8000 8501
CMD ["fraud", "--help"]
