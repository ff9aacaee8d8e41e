"""Where a study lives: a storage URL parsed once, the Optuna storage it opens, the study lock, `load_study`.

    journal:PATH                      Optuna's journal file (safe for parallel local writers)
    sqlite:///PATH                    a SQLite file (one writer at a time)
    postgresql://USER:PASS@HOST/DB    any SQLAlchemy URL: several machines share it

A URL's password is never stored in a study or printed: `StorageURL.redacted` is the only form shown.
"""

from __future__ import annotations

import errno
import hashlib
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from nas.config import first_line
from nas.processes import file_lock

# What a storage raises when its database is gone: Optuna wraps SQLAlchemy's errors, mostly.
STORAGE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
SCHEMA_LOCK = "vmoe-nas: Optuna's tables"  # an advisory lock's key: no study name has a space
FILE_NAMES = {"journal": "journal.log", "sqlite": "study.db"}  # a study's storage file under results/<study>/


class StorageError(RuntimeError):
    """The study storage cannot be opened or reached."""


class NoSpaceLeft(StorageError):
    """A disk filled up while a study, or a file beside it, was written."""

    def __init__(self, path: str | Path, what: str):
        super().__init__(f"no space left on {path}: {what}")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) says the disk is full: ENOSPC, or SQLite's "database or disk is full"."""
    cause = root_cause(error)
    return (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "disk is full" in str(cause)


@dataclass(frozen=True)
class StorageURL:
    url: str  # as given, password included: only ever handed to the database driver
    kind: str  # journal, sqlite, postgresql or rdb (another SQLAlchemy database)
    path: Path | None  # the file of a journal or SQLite storage

    @property
    def redacted(self) -> str:
        """The URL without its credentials: what logs, errors, model cards and the stored config show."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else self.url

    @property
    def sqlalchemy_url(self) -> str:
        if self.kind == "postgresql":  # psycopg 3, which the postgres extra installs
            return "postgresql+psycopg://" + self.url.split("://", 1)[1]
        return self.url

    def lock_path(self, name: str) -> Path | None:
        """The file lock `name` holds, beside a file storage. Not `<journal>.lock`: Optuna's journal lock
        uses that name and deletes it after its grace period."""
        return None if self.path is None else self.path.with_name(f"{self.path.name}.{name}-lock")

    def __str__(self) -> str:
        return self.redacted


def parse_storage(url: str | StorageURL) -> StorageURL:
    if isinstance(url, StorageURL):
        return url
    if not isinstance(url, str) or not url:
        raise StorageError(f"a storage URL must be a non-empty string, got {url!r}")
    if url.startswith("journal:"):
        return StorageURL(url, "journal", Path(url.removeprefix("journal:")))
    if url == "sqlite:///:memory:":  # no file
        return StorageURL(url, "sqlite", None)
    if url.startswith("sqlite:///"):
        return StorageURL(url, "sqlite", Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgresql+")):
        return StorageURL(url, "postgresql", None)
    if "://" not in url:
        raise StorageError(f"{url!r} is not a storage URL (journal:PATH, sqlite:///PATH or postgresql://...)")
    return StorageURL(url, "rdb", None)


def file_storage(kind: str, study_dir: Path) -> StorageURL:
    path = Path(study_dir) / FILE_NAMES[kind]
    return parse_storage(f"journal:{path}" if kind == "journal" else f"sqlite:///{path}")


def existing_storage(study_dir: Path) -> StorageURL | None:
    """The journal or SQLite file a search wrote under `study_dir`, if any (journal first)."""
    for kind in FILE_NAMES:
        found = file_storage(kind, study_dir)
        if found.path.is_file():
            return found
    return None


def default_storage(study_dir: Path, workers: int) -> StorageURL:
    """An existing storage of the study, so it resumes; else a SQLite file, or a journal file when several
    local workers share it (SQLite locks under parallel writers)."""
    return existing_storage(study_dir) or file_storage("journal" if workers > 1 else "sqlite", study_dir)


def make_storage(url: str | StorageURL) -> optuna.storages.BaseStorage:
    """The Optuna storage at `url`. Trials of dead workers are found by `nas.liveness` on every storage
    alike, so RDB storages get no Optuna heartbeats (a journal file has none)."""
    url = parse_storage(url)
    if url.path is not None:
        url.path.parent.mkdir(parents=True, exist_ok=True)
    if url.kind == "journal":
        return JournalStorage(JournalFileBackend(str(url.path)))
    try:
        # Opening a fresh database creates Optuna's tables and stamps its schema version, neither of which
        # Optuna guards: workers (or a reader) opening it at once would fail on "table already exists".
        with _exclusive(url, SCHEMA_LOCK, "schema"):
            return RDBStorage(url.sqlalchemy_url, engine_kwargs={"pool_pre_ping": True})
    except Exception as error:  # SQLAlchemy's errors, a missing driver: all mean "cannot open it"
        raise StorageError(f"cannot open storage {url.redacted}: {first_line(error)}") from None


def root_cause(error: BaseException) -> BaseException:
    """The error under Optuna's and SQLAlchemy's wrappers (e.g. SQLite's "database disk image is malformed")."""
    while error.__cause__ is not None or getattr(error, "orig", None) is not None:
        error = error.__cause__ or error.orig
    return error


def check_sqlite(path: Path) -> None:
    """A StorageError naming `path` if SQLite finds it damaged (bytes overwritten, cut short): read as it was,
    Optuna would fail deep inside a query with a message about "invalid data in the commit"."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as error:
        problems = [str(error)]
    if problems != ["ok"]:
        said = " ".join("; ".join(problems).split())[:300]  # one line: SQLite's rows hold newlines
        raise StorageError(f"{path} is damaged, not a study SQLite can read ({said}): restore it from a copy; "
                           "its trials cannot be read")


def study_lock(url: str | StorageURL, study_name: str):
    """Serialise changes to a study's trial queue across processes. Other databases than PostgreSQL and
    file storages: run one launcher."""
    return _exclusive(parse_storage(url), study_name, "queue")


@contextmanager
def _exclusive(url: StorageURL, key: str, file_name: str):
    """A lock across processes: a PostgreSQL advisory lock on `key` (so across machines too), or a lock file
    `<storage file>.<file_name>-lock` beside a SQLite or journal file; none on other databases."""
    if url.kind == "postgresql":
        engine = sqlalchemy.create_engine(url.sqlalchemy_url)
        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": number})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": number})
        finally:
            engine.dispose()
    elif url.path is not None:
        path = url.lock_path(file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path):
            yield
    else:
        yield


def load_study(study_name: str, *, storage: str | StorageURL | None = None,
               results_dir: str | Path = "results") -> optuna.Study:
    """An existing study: from `storage`, or from the journal or SQLite file a search wrote under
    results_dir/<study>/. Never creates a storage."""
    folder = Path(results_dir) / study_name
    url = parse_storage(storage) if storage else existing_storage(folder)
    if url is None:
        raise StorageError(f"no study storage in {folder}: neither {folder / FILE_NAMES['journal']} nor "
                           f"{folder / FILE_NAMES['sqlite']} exists (pass --storage URL or --results-dir)")
    if url.path is not None and not url.path.is_file():  # opening a missing file would create an empty storage
        raise StorageError(f"no study storage at {url.path}")
    if url.kind == "sqlite" and url.path is not None:
        check_sqlite(url.path)
    backend = make_storage(url)
    try:
        return optuna.load_study(study_name=study_name, storage=backend)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(backend))
        raise StorageError(f"no study {study_name!r} in {url.redacted} (it holds: {', '.join(names) or 'none'})") \
            from None


__all__ = ["STORAGE_ERRORS", "NoSpaceLeft", "StorageError", "StorageURL", "default_storage", "existing_storage",
           "is_disk_full", "load_study", "make_storage", "parse_storage", "study_lock"]
