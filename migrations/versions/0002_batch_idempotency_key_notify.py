"""Batch idempotency keys, revocation notices for API-key caches, uncompressed chunks.

- ``batches.idempotency_key`` / ``request_hash``, unique per tenant: ``POST /v1/batches``
  takes an ``Idempotency-Key`` with the semantics of jobs.
- A trigger on ``api_keys`` sends ``NOTIFY cnc_api_keys, '<prefix>'`` when a key is
  revoked or deleted, so every API process drops it from its auth cache at once.
- ``blob_chunks.data`` is stored ``PLAIN`` (0001 made it ``EXTERNAL``): rows of at most
  8,000 bytes stay in their heap page instead of being cut into ~2 KB TOAST rows with an
  index entry each, which made the database ingest uploads about 1.4x faster (see
  ``app/db/blobs.py``). Chunks written before stay readable.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY_FUNCTION = """
CREATE FUNCTION cnc_api_keys_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' OR (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL) THEN
        PERFORM pg_notify('cnc_api_keys', OLD.prefix);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER api_keys_notify AFTER UPDATE OR DELETE ON api_keys
FOR EACH ROW EXECUTE FUNCTION cnc_api_keys_notify()
"""


def upgrade() -> None:
    op.add_column("batches", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("batches", sa.Column("request_hash", sa.String(length=64), nullable=True))
    op.create_unique_constraint(
        "uq_batches_tenant_idempotency", "batches", ["tenant_id", "idempotency_key"]
    )
    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)
    op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE PLAIN")


def downgrade() -> None:
    op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL")  # as in 0001
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("DROP FUNCTION cnc_api_keys_notify()")
    op.drop_constraint("uq_batches_tenant_idempotency", "batches", type_="unique")
    op.drop_column("batches", "request_hash")
    op.drop_column("batches", "idempotency_key")
