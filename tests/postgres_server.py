"""A throwaway PostgreSQL server for tests and benches: initdb into a temp dir, serve on
a free loopback port with trust auth, and hand out databases on it.

Pytest-free on purpose (the bench uses it too); the fixture decides whether a missing
PostgreSQL skips or fails. initdb and postgres refuse to run as root, so as root the
server runs as the `postgres` system user (runuser), owning its temp dir.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.ports import free_port

START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0
SERVER_USER = "postgres"


def find_postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then Debian's
    /usr/lib/postgresql/<version>/bin (newest version)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent  # a /usr/local/bin symlink -> the real dir
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(
        Path(d).parent.name) if Path(d).parent.name.isdigit() else 0, reverse=True)
    for d in dirs:
        if all((Path(d) / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    return None


class PostgresServer:
    """`with PostgresServer() as pg: pg.url` (the `tiered` database). `stop()` and
    `start()` take the server down and up on the same port and data directory."""

    def __init__(self, *, durable: bool = False, database: str = "tiered") -> None:
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL is not installed (no initdb on PATH or "
                                    "under /usr/lib/postgresql/*/bin)")
        self.bin = bin_dir
        self.durable = durable  # False: fsync off, for fast tests; True: as in production
        self.database = database
        self.port = 0
        self.root: Path | None = None
        self.running = False
        self._as: list[str] = []

    # ---- paths and commands ------------------------------------------------------------
    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def _run(self, exe: str, args: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        cmd = [*self._as, str(self.bin / exe), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=self.root, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{exe} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}{self._log_tail()}")
        return proc.stdout

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + self.log_file.read_text()[-2000:]
        except OSError:
            return ""

    # ---- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> PostgresServer:
        try:
            self._init()
            self.start()
            self.create_database(self.database)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _init(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tiered-pg-"))
        os.chmod(self.root, 0o700)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError("running as root and there is no `postgres` user to run "
                                   "PostgreSQL as (initdb refuses root)") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", SERVER_USER, "--"]
        (self.root / "sock").mkdir()
        if self._as:
            shutil.chown(self.root / "sock", SERVER_USER, SERVER_USER)
        self._run("initdb", ["-D", str(self.data), "-U", "postgres", "--auth=trust",
                             "-E", "UTF8", "--no-locale", "--no-sync"])
        self.port = free_port()

    def start(self) -> None:
        """Start the server and wait (up to 30 s) until it takes connections."""
        # fsync=off only: a commit still reaches the OS before it returns, so it survives
        # the server being killed (stop("immediate")), just not the machine crashing.
        fast = "" if self.durable else " -c fsync=off"
        opts = (f"-p {self.port} -k {self.root}/sock -c listen_addresses=127.0.0.1"
                f" -c max_connections=200{fast}")
        self._run("pg_ctl", ["-D", str(self.data), "-l", str(self.log_file), "-o", opts,
                             "-w", "-t", str(int(START_TIMEOUT_S)), "start"],
                  timeout_s=START_TIMEOUT_S + 10)
        self.running = True
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            proc = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-t", "2"], capture_output=True, timeout=10, check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL not ready on port {self.port} within "
                                   f"{START_TIMEOUT_S:g}s{self._log_tail()}")
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Take the server down (mode: smart, fast or immediate); the data stays."""
        if self.running:
            self._run("pg_ctl", ["-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"])
            self.running = False

    def close(self) -> None:
        if self.root is None:
            return
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ---- databases ---------------------------------------------------------------------
    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())  # identifiers we made, not input

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it, disconnecting whoever is still connected."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
