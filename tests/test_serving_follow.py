"""`serve` follows its alias: a promotion or rollback reaches a running server without dropping a request."""

from __future__ import annotations

import threading
import time

import pytest

from lora_pipeline import promotion, tracking
from lora_pipeline.config import RegistryConfig
from lora_pipeline.registry import register_model
from lora_pipeline.serving import AliasFollower, build_app
from tests.helpers.serving import free_port, http
from tests.tiny_model import build_tiny_llama

NAME = "tiny-served"
CHAT = {"messages": [{"role": "user", "content": "repeat red cat"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def registry(mlflow_workdir, tmp_path_factory):
    """Two registered versions of a tiny model; version 1 is the champion."""
    out = tmp_path_factory.mktemp("served")
    model = build_tiny_llama(out / "model")
    uri = tracking.default_tracking_uri(out)
    run_id = tracking.start_pipeline_run(uri, "exp", out / "mlartifacts", "run", {})
    for key in ("one", "two"):
        register_model(tracking_uri=uri, run_id=run_id, model_dir=model.path, registry_cfg=RegistryConfig(model_name=NAME),
                       run_key=key, tags={}, input_example=CHAT["messages"])
    promotion.promote(uri, NAME, "1")
    return uri


@pytest.fixture(autouse=True)
def nothing_in_cwd(mlflow_workdir):
    yield
    assert list(mlflow_workdir.iterdir()) == []


class Server:
    """The app of a source on a real uvicorn server in a thread (requests really run concurrently)."""

    def __init__(self, source: AliasFollower) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(build_app(source, f"{NAME}@champion"), host="127.0.0.1",
                                                    port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Traffic:
    """Clients sending chat requests in a loop; every reply is recorded (status, version served then)."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url, self.replies, self.errors = url, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            try:
                reply = http("POST", f"{self.url}/v1/chat/completions", CHAT)
                self.replies.append(reply["choices"][0]["finish_reason"])
            except Exception as exc:  # noqa: BLE001 - any failed request fails the test
                self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _wait_for_version(url: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while http("GET", f"{url}/health")["version"] != version:
        assert time.monotonic() < deadline, f"the server never moved to version {version}"
        time.sleep(0.1)


def test_promotion_and_rollback_reach_a_server_under_load_without_a_failed_request(registry):
    source = AliasFollower(registry, f"{NAME}@champion")
    with Server(source) as server, Traffic(server.url) as traffic:
        assert http("GET", f"{server.url}/health")["version"] == "1"
        time.sleep(0.5)
        promotion.promote(registry, NAME, "2")
        assert source.refresh() is True  # loads version 2 next to 1, then swaps
        assert http("GET", f"{server.url}/health")["version"] == "2"
        answered_before_rollback = len(traffic.replies)
        promotion.rollback(registry, NAME)
        assert source.refresh() is True
        assert http("GET", f"{server.url}/health")["version"] == "1"
        assert source.refresh() is False  # nothing moved: nothing reloaded
        time.sleep(0.5)
    assert traffic.errors == []
    assert answered_before_rollback > 0 and len(traffic.replies) > answered_before_rollback


def test_the_follower_thread_picks_up_a_promotion_by_itself(registry):
    promotion.promote(registry, NAME, "1")
    source = AliasFollower(registry, f"{NAME}@champion")
    source.follow(0.2)
    try:
        with Server(source) as server, Traffic(server.url, clients=2) as traffic:
            promotion.promote(registry, NAME, "2")
            _wait_for_version(server.url, "2")
        assert traffic.errors == [] and traffic.replies
    finally:
        source.stop()
        promotion.promote(registry, NAME, "1")


def test_an_unknown_alias_is_refused_at_start(registry):
    with pytest.raises(LookupError, match="has no alias 'staging'"):
        AliasFollower(registry, f"{NAME}@staging")


def test_commands_honour_mlflow_tracking_and_registry_uris_from_the_environment(registry, tmp_path, monkeypatch,
                                                                                capsys):
    """As MLflow users expect: config or --set wins, then MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, then the default."""
    import json

    from lora_pipeline.cli import main
    from lora_pipeline.config import MlflowConfig

    elsewhere = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == tracking.default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    assert tracking.resolve_tracking_uri(MlflowConfig(), tmp_path) == registry
    assert tracking.resolve_tracking_uri(MlflowConfig(tracking_uri=elsewhere), tmp_path) == elsewhere
    # `promote` (like serve, rollback and run) finds the registry through the environment alone.
    assert main(["promote", NAME, "2", "--set", f"output_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"]["champion"] == "2"
    # A registry of its own: tracking elsewhere, registry from MLFLOW_REGISTRY_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry)
    assert main(["rollback", NAME, "--set", f"output_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"]["champion"] == "1"
