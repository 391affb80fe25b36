"""Celery workers: run ``cnc_core`` jobs, validate uploads, deliver callbacks."""
