"""The HTTP API (FastAPI): one router per resource under ``app.api.routes``."""
