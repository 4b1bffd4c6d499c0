"""Alembic environment: runs on the connection that :meth:`Database.migrate` hands over."""

from __future__ import annotations

from alembic import context

from dicomnode.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - we never run Alembic's own CLI
    raise RuntimeError("run migrations with 'dicomnode db upgrade', not the alembic command")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
