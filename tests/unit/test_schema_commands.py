"""``status`` and ``requeue`` never change the schema; ``db upgrade`` and ``serve`` do.

On SQLite and on a real PostgreSQL server: a database with no schema, one an older
dicomnode left behind (schema revision 0002) and one at the newest revision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from support import write_config

from dicomnode.cli import EXIT_ERROR, EXIT_OK, main
from dicomnode.db import Database
from dicomnode.db.database import _MIGRATIONS_DIR
from dicomnode.errors import DicomNodeError


def _config(tmp_path: Path, url: str) -> Path:
    return write_config(tmp_path, 11112, database={"url": url})


def _upgrade_to(db: Database, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    with db.engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()


def _tables(db: Database) -> set[str]:
    with db.engine.connect() as connection:
        return set(inspect(connection).get_table_names())


@pytest.mark.parametrize("command_args", [["status"], ["requeue", "--failed"]])
def test_commands_refuse_a_database_without_schema_and_create_nothing(
    tmp_path: Path, db_url: str, command_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, db_url)
    code = main([*command_args, "--config", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "no dicomnode schema yet" in err and "dicomnode db upgrade" in err
    assert _tables(Database(db_url)) == set()


@pytest.mark.parametrize("command_args", [["status"], ["requeue", "--failed"]])
def test_commands_refuse_an_older_schema_and_leave_it_as_it_is(
    tmp_path: Path, db_url: str, command_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(db_url)
    _upgrade_to(db, "0002")
    config = _config(tmp_path, db_url)
    code = main([*command_args, "--config", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "schema revision 0002" in err and "needs 0004" in err
    assert "dicomnode db upgrade" in err
    assert db.schema_revisions() == ({"0002"}, {"0004"})


def test_db_upgrade_migrates_then_status_works(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Database(db_url)
    _upgrade_to(db, "0002")
    config = _config(tmp_path, db_url)
    assert main(["db", "upgrade", "--config", str(config)]) == EXIT_OK
    current, newest = db.schema_revisions()
    assert current == newest == {"0004"}
    capsys.readouterr()
    assert main(["status", "--config", str(config)]) == EXIT_OK
    assert "no studies received yet" in capsys.readouterr().out


def test_a_schema_from_a_newer_dicomnode_is_named_as_such(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    db = Database(url)
    db.migrate()
    with db.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DicomNodeError, match="newer dicomnode"):
        db.require_current_schema()


def test_reprocess_queues_a_done_study_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from support import queue_studies

    from dicomnode.config import load_settings
    from dicomnode.queue import claim, finish

    url = f"sqlite:///{tmp_path / 'index.db'}"
    config = _config(tmp_path, url)
    settings = load_settings(config)
    db = Database(url)
    db.migrate()
    (uid,) = queue_studies(db, settings, 1)
    job = claim(db, "w")
    assert job is not None and finish(db, job, "w", [], [], {"pipeline": "placeholder"})
    capsys.readouterr()
    assert main(["reprocess", uid, "--config", str(config)]) == EXIT_OK
    assert f"queued {uid}" in capsys.readouterr().out
    again = claim(db, "w")
    assert again is not None and again.study_instance_uid == uid and again.id != job.id
