"""Database layer shared by the API and the workers: typed models, sessions, blob store.

Nothing here imports torch, FastAPI or Celery, so both sides import it freely.
"""
