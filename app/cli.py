"""Administration: API keys and migrations.

python -m app.cli keys create --tenant acme [--name ci]   # prints the key once
python -m app.cli keys list [--tenant acme]
python -m app.cli keys revoke <prefix>
python -m app.cli migrate
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.security import new_api_key, new_callback_secret
from app.db.models import ApiKey, Tenant
from app.db.session import get_engine


@dataclass(frozen=True)
class CreatedKey:
    token: str
    prefix: str
    tenant: str
    tenant_id: uuid.UUID
    callback_secret: str


def create_key(engine: Engine, settings: Settings, tenant: str, name: str = "") -> CreatedKey:
    """Mint a key for ``tenant`` (created on first use)."""
    with Session(engine) as session, session.begin():
        row = session.scalars(select(Tenant).where(Tenant.name == tenant)).one_or_none()
        if row is None:
            row = Tenant(id=uuid.uuid4(), name=tenant, callback_secret=new_callback_secret())
            session.add(row)
            session.flush()
        key = new_api_key(settings.secret_key)
        session.add(ApiKey(tenant_id=row.id, name=name, prefix=key.prefix, key_hash=key.hash))
        return CreatedKey(key.token, key.prefix, row.name, row.id, row.callback_secret)


def revoke_key(engine: Engine, prefix: str) -> bool:
    with engine.begin() as conn:
        result = conn.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
            .returning(ApiKey.id)
        ).all()
    return bool(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    listing = ksub.add_parser("list")
    listing.add_argument("--tenant")
    revoke = ksub.add_parser("revoke")
    revoke.add_argument("prefix", help="the key's prefix (the part after 'cnc_')")
    sub.add_parser("migrate", help="upgrade the database to the latest schema")
    args = parser.parse_args(argv)

    settings = get_settings()
    if args.command == "migrate":
        from app.db.migrate import upgrade

        upgrade(settings.database_url)
        print("database is at the latest revision")
        return 0
    engine = get_engine(settings.database_url, 1, 1)
    if args.action == "create":
        key = create_key(engine, settings, args.tenant, args.name)
        print(f"tenant:          {key.tenant}")
        print(f"api key:         {key.token}")
        print(f"callback secret: {key.callback_secret}")
        print("the key is shown once; store it now")
        return 0
    if args.action == "list":
        with Session(engine) as session:
            query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
            if args.tenant:
                query = query.where(Tenant.name == args.tenant)
            for row, tenant in session.execute(query.order_by(ApiKey.created_at)):
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.prefix}  {tenant:20s}  {row.name:12s}  {state}  {row.created_at:%F}")
        return 0
    if revoke_key(engine, args.prefix):
        print(f"revoked {args.prefix}")
        return 0
    print(f"no active key with prefix {args.prefix}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
