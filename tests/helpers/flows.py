"""The fine-tuning flow run in-process as `lora-pipeline run` runs it, and a webhook behind a notification block.

Shared by tests/test_flow_e2e.py and the flow tests under tests/reliability/ (each with its own Prefect API).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_pipeline.run_request import as_worker
from tests.helpers.webhook import webhook_receiver

#: The override that sends a run's notices to the block ``alert_webhook`` saves.
NOTIFY = "notify.block=custom-webhook/e2e-alerts"


def run_flow(config: Path, *overrides: str, summary_json: Path | None = None) -> dict:
    """The flow as `lora-pipeline run` runs it: this process is the worker, its overrides are trusted."""
    from flows.finetune import finetune  # imported late: Prefect reads the environment at import

    with as_worker(config, overrides, summary_json):
        return finetune(config_path=str(config))


@contextmanager
def alert_webhook() -> Iterator[list[dict]]:
    """A webhook on loopback behind a saved Prefect notification block (runs name it with ``NOTIFY``); yields
    the list every notice it receives is appended to. Needs a Prefect API."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    with webhook_receiver() as (url, received):
        CustomWebhookNotificationBlock(name="e2e", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
                                       allow_private_urls=True).save("e2e-alerts", overwrite=True)
        yield received
