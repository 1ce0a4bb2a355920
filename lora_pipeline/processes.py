"""Child processes that never outlive the stage that started them.

Training launches torchrun, which starts the ranks: a tree of processes. If the stage is stopped (its
Prefect timeout, a cancelled flow run, Ctrl-C), killing torchrun alone would orphan the ranks, still
holding memory and GPUs. So the tree runs in its own process group, the wait for it can be interrupted
(it polls instead of blocking in ``waitpid``, where Python cannot raise), and on any interruption the
whole group gets SIGTERM (a rank saves a checkpoint on it), then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

#: Seconds the group has to exit after SIGTERM before it is killed.
TERMINATE_GRACE_SECONDS = 30.0


def run_process_group(command: list[str], *, poll_seconds: float = 0.5, **popen_kwargs: Any) -> int:
    """Run ``command`` in a new process group and return its exit code; stop the whole group if interrupted.

    Raises:
        Whatever interrupted the wait (a timeout, KeyboardInterrupt, ...), after the group is gone.
    """
    process = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    try:
        while True:
            try:
                return process.wait(timeout=poll_seconds)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen, grace_seconds: float = TERMINATE_GRACE_SECONDS) -> None:
    """SIGTERM the process's group, give its leader ``grace_seconds`` to exit (torchrun stops its ranks
    itself), then SIGKILL whatever is left of the group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        process.wait()
        return
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        pass
    try:
        # Also after the leader exited: a member that ignored SIGTERM must not outlive the stage. (Asking
        # the group whether it is empty would not do: exited members linger as zombies until reaped.)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
