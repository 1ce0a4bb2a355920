"""Prefect's temporary API server for a flow run in this process, started while the flow's modules import.

Without ``PREFECT_API_URL`` Prefect starts a temporary server on a flow's first API call
(``SubprocessASGIServer``): a uvicorn subprocess that imports the server and migrates its SQLite database
(8-9 s on 2 cores) while the calling process waits. To reach that class the calling process imports
``prefect.server.api.server`` too (FastAPI, SQLAlchemy, the ORM and every route: 6-8 s on 2 cores), although
it never serves a request itself. ``lora-pipeline run`` starts the same uvicorn command itself instead, on a
socket it has already bound (``--fd``: the port is known at once and nobody can take it), points this
process's Prefect settings at it, and imports the flow while the server starts: the two overlap, and the
server's modules are imported once, in the server. The server runs as Prefect runs its own (same command
and environment, UI off; it reads Prefect's settings as this process does) and is stopped at exit, as Prefect
stops its own. Prefect logs nothing for a server it did not start, so :attr:`TemporaryApiStart.address` gives
the CLI the URL to print.

It starts before this process imports Prefect, so an API configured in a Prefect profile or settings file
(not in the environment) is only seen after the start: the server, still importing, is then stopped unused.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

#: What Prefect sets for its own temporary server (``SubprocessASGIServer._run_uvicorn_command``): no UI.
TEMPORARY_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
#: How long a stopping server may take before it is killed (Prefect's own waits as long).
STOP_TIMEOUT_SECONDS = 5.0


class TemporaryApiStart:
    """A start of a temporary Prefect API server in a subprocess (nothing when an API is configured).

    Once constructed, this process's Prefect settings name the server's API (``PREFECT_API_URL``, in the
    environment and in Prefect's global settings, so every thread's client uses it); :meth:`wait` blocks
    until it answers. It is stopped at exit, or by :meth:`stop`. The settings keep naming it for the rest of
    the process, so a later run in the same process uses the same server, as Prefect's own would be reused.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._address: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        if os.environ.get("PREFECT_API_URL"):
            return  # a server is configured (make up, a worker): the flow run uses that one
        # Started before Prefect is imported here (1.3-2 s), so that its start overlaps that import too. The
        # server reads Prefect's settings (environment, profile, settings files) itself, as this process does.
        self._spawn()
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        if PREFECT_API_URL.value():  # configured in a Prefect profile or settings file: not needed after all
            self.stop()
            return
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = f"{self._address}/api"
        # Prefect would infer a UI at the API's address and log "View at <link>" for each flow run: this server
        # has no UI (Prefect's own temporary server logs no link either).
        os.environ.setdefault("PREFECT_UI_URL", "")
        refresh_global_settings_context()  # Prefect read the environment at import; every thread reads this
        self._thread = threading.Thread(target=self._wait_until_healthy,
                                        args=(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()),),
                                        name="prefect-temporary-api", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether a temporary server was started here (False when an API is configured)."""
        return self._thread is not None

    def _spawn(self) -> None:
        """Start the server on a loopback socket bound here (stopped at exit)."""
        prefect_dir = importlib.util.find_spec("prefect").submodule_search_locations[0]  # type: ignore[union-attr]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)  # connections made before the server accepts wait in the backlog
            self._address = f"http://127.0.0.1:{listener.getsockname()[1]}"
            self._process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect_dir).parent), "--factory",
                 "prefect.server.api.server:create_app", "--fd", str(listener.fileno()), "--log-level", "error",
                 "--lifespan", "on"],
                env={**os.environ, **TEMPORARY_SERVER_ENV}, pass_fds=(listener.fileno(),))
        finally:
            listener.close()  # the server holds its own copy
        atexit.register(self.stop)

    @property
    def address(self) -> str | None:
        """The temporary server's URL once it answers (its API, without the UI); None otherwise."""
        if self._thread is None or self._thread.is_alive() or self.error is not None:
            return None
        return self._address

    def _wait_until_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        try:
            with httpx.Client(timeout=max(timeout, 1.0)) as client:
                while True:
                    code = self._process.poll()  # type: ignore[union-attr]
                    if code is not None:
                        raise RuntimeError(f"Prefect's temporary API server exited with code {code} before it "
                                           "answered (its own messages are above)")
                    try:
                        if client.get(f"{self._address}/api/health").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Prefect's temporary API server did not answer within {timeout:.0f} s "
                                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
                    time.sleep(0.1)
        except BaseException as exc:  # handed to the caller by wait()
            self.error = exc

    def wait(self) -> None:
        """Block until the server answers; a flow run must not find it half started.

        Raises:
            RuntimeError: The server exited or did not answer in time (it is stopped first).
        """
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            self.stop()
            raise RuntimeError(str(self.error)) from self.error

    def stop(self) -> None:
        """Stop the server (registered at exit; again is harmless)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
