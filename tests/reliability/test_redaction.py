"""Known secrets are removed from text and from every log record, tracebacks included."""

from __future__ import annotations

import logging

import pytest

from lora_pipeline import redaction


@pytest.fixture(autouse=True)
def clean_registry():
    redaction.forget_secrets()
    yield
    redaction.forget_secrets()


def test_registered_values_are_redacted_longest_first_and_short_ones_ignored():
    redaction.register_secret("s3cr3t-value")
    redaction.register_secret("s3cr3t-value-and-more")
    redaction.register_secret("abc")  # too short to redact safely
    assert redaction.redact("a s3cr3t-value-and-more b s3cr3t-value abc") == "a *** b *** abc"
    assert redaction.mask_secrets("login with s3cr3t-value at https://u:other@h") == "login with *** at https://u:***@h"


def test_secret_environment_variables_are_registered():
    redaction.register_environment({"HF_TOKEN": "hf_from_the_environment", "HOME": "/root/not-a-secret"})
    assert redaction.redact("hf_from_the_environment /root/not-a-secret") == "*** /root/not-a-secret"


def test_every_log_record_is_redacted_message_arguments_and_traceback(caplog):
    redaction.install_log_redaction()
    redaction.register_secret("pa55word-canary")
    logger = logging.getLogger("lora_pipeline.test_redaction")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("connecting with %s", "pa55word-canary")
        try:
            raise RuntimeError("refused for pa55word-canary")
        except RuntimeError:
            logger.exception("stage failed")
    text = caplog.text + "".join(record.exc_text or "" for record in caplog.records)
    assert "pa55word-canary" not in text
    assert "connecting with ***" in caplog.text and "refused for ***" in text
