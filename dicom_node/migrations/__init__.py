"""The job store's schema migrations (Alembic), run by :func:`dicom_node.db.upgrade_schema`
at every start-up and by ``dicom-node db upgrade``.

Configured in code (:func:`dicom_node.db.alembic_config`): no ``alembic.ini``. Revision
``0001`` is the schema of release 0.1, frozen in :mod:`dicom_node.migrations.baseline`;
every later change of :mod:`dicom_node.db`'s tables is a revision in ``versions/``.
A new one is started from a checkout with

    .venv/bin/python -c "from alembic import command; from dicom_node import db; \\
      command.revision(db.alembic_config(), 'what it does', rev_id='0003')"

then filled in by hand (SQLite needs ``op.batch_alter_table`` for anything but adding a
nullable column or an index), and checked by ``tests/test_migrations.py``.
"""
