"""Prefect's temporary API server for a flow run in this process, started while the flow's modules import.

Without ``PREFECT_API_URL`` Prefect starts a temporary server on a flow's first API call: a uvicorn
subprocess that imports the server and migrates its SQLite database (6-9 s on 2 cores) while the
calling process waits. ``lora-pipeline run`` starts it first, on a thread that only waits for it, and
meanwhile imports the flow (MLflow and the pipeline's modules, 4-5 s): the two overlap. Prefect's client
then finds the same server running (``SubprocessASGIServer`` is one instance per port) and uses it; it
stops at exit as Prefect's own does. Prefect logs "Starting temporary server on ..." before its logging is
configured, so the line would be lost: :attr:`TemporaryApiStart.address` gives the CLI the URL to print.
"""

from __future__ import annotations

import threading


class TemporaryApiStart:
    """A start of Prefect's temporary server on a background thread (nothing when an API is configured).

    The server module is imported on the calling thread, before the thread starts: two threads importing
    overlapping packages at once can hand one of them a partially initialised module.
    """

    def __init__(self) -> None:
        from prefect.settings import PREFECT_API_URL

        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._server: object | None = None
        if PREFECT_API_URL.value():
            return  # a server is configured (make up, a worker): the flow run uses that one
        from prefect.server.api.server import SubprocessASGIServer

        self._server = SubprocessASGIServer()
        self._thread = threading.Thread(target=self._start, args=(self._server,),
                                        name="prefect-temporary-api", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether a temporary server was started here (False when an API is configured)."""
        return self._thread is not None

    @property
    def address(self) -> str | None:
        """The temporary server's URL once started here (its API; Prefect starts it without the UI); None otherwise."""
        if self._thread is None or self._thread.is_alive() or self.error is not None:
            return None
        return self._server.address  # type: ignore[attr-defined]

    def _start(self, server: object) -> None:
        try:
            server.start()  # type: ignore[attr-defined]
        except BaseException as exc:  # the flow's own first API call starts it again, and says why it fails
            self.error = exc

    def wait(self) -> None:
        """Block until the server answers, or its start failed: a flow run must not find it half started
        (Prefect's ``start`` marks it running before it answers)."""
        if self._thread is not None:
            self._thread.join()
