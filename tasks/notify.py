"""Notices: a Prefect event for every failed run and rejected candidate, and a message through the
configured notification block (``notify.block``)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.events import emit_event

from lora_pipeline.config import NotifyConfig
from lora_pipeline.reports import Notice
from tasks.policy import MINUTE, TRANSIENT_RETRIES, redacts_secrets


# Retried: the notification service may be briefly unreachable. The event is raised after the message
# went out, so a retried attempt does not raise it twice.
@task(name="announce", timeout_seconds=5 * MINUTE, **TRANSIENT_RETRIES)
@redacts_secrets
def announce(notify: NotifyConfig, notice: Notice) -> bool:
    """Send ``notice`` through ``notify.block`` (when set) and raise its Prefect event.

    Returns:
        True when a message was sent, False when only the event was raised.
    """
    sent = False
    if notify.block:
        from prefect.blocks.core import Block

        Block.load(notify.block).notify(body=notice.body, subject=notice.subject)
        sent = True
    emit_event(event=notice.event, resource=notice.resource, payload={**notice.payload, "message": notice.body})
    get_run_logger().info("%s (%s)", notice.subject, f"sent via {notify.block}" if sent else "event only")
    return sent
