"""A throwaway PostgreSQL server for tests: its own cluster in a temporary folder, on 127.0.0.1.

    server = PostgresServer().start()     # initdb (once) and pg_ctl start on a free port
    url = server.create_database("t1")    # postgresql://postgres:<password>@127.0.0.1:<port>/t1
    server.restart()                      # stop fast and start again on the same port
    server.stop()                         # stop it and remove the folder

TCP logins need the password (scram-sha-256), so tests see a URL with a
password in it, as a deployment would have; the Unix socket in the folder is
trusted. initdb refuses to run as root: as root, the cluster belongs to the
`postgres` user and every server command runs as that user (runuser or su).
Every wait in here is bounded.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = "sudo apt-get install postgresql (Debian/Ubuntu)"


class PostgresNotInstalled(RuntimeError):
    pass


def find_binaries() -> Path:
    """The folder holding initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (newest), or PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: _version(path), reverse=True)
    for folder in candidates:
        if os.access(os.path.join(folder, "initdb"), os.X_OK) and os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
            return Path(folder)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    raise PostgresNotInstalled(f"PostgreSQL is not installed (no initdb or pg_ctl): {INSTALL_HINT}")


def _version(folder: str) -> tuple[int, ...]:
    name = Path(folder).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _let_postgres_through(folder: Path) -> None:
    """As root, a folder given inside a private temporary one (mkdtemp: mode 0700): let `postgres` pass through
    the temporary folders on the way (search permission only, nothing listed or read)."""
    temporary = Path(tempfile.gettempdir()).resolve()
    for parent in [folder, *folder.parents]:
        if parent == temporary or temporary not in parent.parents:
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


class PostgresServer:
    """One cluster, one port. `start()` makes the cluster the first time; `stop()` removes it."""

    def __init__(self, folder: Path | None = None, port: int | None = None) -> None:
        """`folder` (created, and removed by stop()): where the cluster lives; by default a new temporary one."""
        self.bin = find_binaries()
        self.port = port or free_port()
        self.password = "pw-" + secrets.token_hex(8)
        self.user = "postgres"
        self.as_root = os.geteuid() == 0
        if self.as_root:  # initdb refuses root: the folder and the cluster belong to `postgres`
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotInstalled("running as root, initdb needs a `postgres` user to own the cluster "
                                           f"(Debian's package creates it): {INSTALL_HINT}") from None
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="chatforge-pg-"))
        else:
            self.folder = Path(folder).resolve()
            self.folder.mkdir(parents=True)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        if self.as_root:
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            if folder is not None:
                _let_postgres_through(self.folder.parent)
        self.running = False
        self._initialised = False

    # ------------------------------------------------------------ URLs

    def url_for(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{self.user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for()

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: int = 60) -> PostgresServer:
        if not self._initialised:
            self._initdb()
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   # a throwaway cluster: durability is not what these tests measure
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(timeout),
                   "-o", options, "start"], timeout=timeout + 10)
        self.running = True
        return self

    def stop_server(self, timeout: int = 60) -> None:
        """Stop the server (fast: connections are cut), keeping the cluster for a later start()."""
        self.resume()
        if self.running:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", str(timeout), "-m", "fast",
                       "stop"], timeout=timeout + 10)
            self.running = False

    def pids(self) -> list[int]:
        """The server's processes: the postmaster (from its pid file) and its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """Stop the server's processes (SIGSTOP): a server that accepts connections and never answers."""
        self._paused = self.pids()
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in getattr(self, "_paused", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []

    def restart(self) -> None:
        """Stop fast and start again on the same port (a database restarted under a running bot)."""
        self.stop_server()
        self.start()

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop_server()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ databases

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it, cutting any connection still open on it."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ------------------------------------------------------------ internals

    def _initdb(self) -> None:
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self.as_root:
            account = pwd.getpwnam("postgres")
            os.chown(password_file, account.pw_uid, account.pw_gid)
        try:
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(password_file),
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                       "--no-sync"], timeout=120)
        finally:
            password_file.unlink(missing_ok=True)
        self._initialised = True

    def _run(self, command: list[str], timeout: int) -> None:
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command] if shutil.which("runuser") else \
                ["su", "postgres", "-c", shlex.join(command)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.folder,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                               f"\n{log}")
