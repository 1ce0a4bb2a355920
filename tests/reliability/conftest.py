"""The flow tests under tests/reliability/ share one Prefect API and one small config (package scope).

Their server is not tests/test_flow_e2e.py's: that module asserts on the events, artifacts and registry its own
runs leave behind, and a failed run from here (the secret-block test fails in validate_data) would satisfy them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.configs import write_tiny_config
from tests.helpers.flows import alert_webhook


@pytest.fixture(scope="package")
def prefect_api():
    """An ephemeral Prefect API on a temporary database, shared by this package's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="package")
def alerts(prefect_api):
    """A webhook on loopback behind a saved Prefect notification block; runs name it with NOTIFY."""
    with alert_webhook() as received:
        yield received


@pytest.fixture(scope="package")
def small_config(tiny_model_dir, tmp_path_factory) -> Path:
    """A config pointing at the tiny model and tiny data files, with a handful of training steps."""
    return write_tiny_config(tmp_path_factory.mktemp("e2e"), tiny_model_dir, "e2e-tiny", system_metrics_interval=0.5)
