"""Alembic's environment: migrate on the connection :func:`dicom_node.db.upgrade_schema`
hands over, inside its transaction (which holds the lock that keeps a second process
from migrating at the same time). Only online migration: the node never writes SQL
scripts."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dicom_node.db import Base


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      compare_type=False)
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if not isinstance(_connection, Connection):
    raise RuntimeError("dicom_node migrations run through dicom_node.db.upgrade_schema, "
                       "with a connection")
_run(_connection)
