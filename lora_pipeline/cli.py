"""``lora-pipeline`` command line: validate the config up front, then run the Prefect flow in-process."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Only what `--help` needs is imported here (issue 12: start-up within 1.5x of the bare import): json,
# logging and typing load in the commands that use them. Type checkers treat this name like typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:  # the config schema (pydantic) is imported by the commands that read a config, not by --help
    from lora_pipeline.config import PipelineConfig

#: Suffixes that make a ``data.path``-like string a local file (anything else may be a hub dataset name).
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gguf")

# The first ephemeral Prefect API start migrates its SQLite database, which can take longer than
# Prefect's 20 s default on 2 cores; library loggers are forwarded to the Prefect task logs. The
# server's telemetry heartbeat is off: the pipeline runs offline, and its first write races the
# migration ("database is locked").
_PROCESS_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "lora_pipeline",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def missing_inputs(cfg: PipelineConfig) -> list[str]:
    """Local input paths named by the config that do not exist (checked before any work starts)."""
    candidates = {
        "data.path": cfg.data.path,
        "data.eval_path": cfg.data.eval_path,
        "eval.regression_qa_path": cfg.eval.regression_qa_path,
        "eval.regression_text_path": cfg.eval.regression_text_path,
        "model.name_or_path": cfg.model.name_or_path,
    }
    problems = []
    for key, value in candidates.items():
        if not value or value.startswith("builtin:") or value in ("auto", "base_answers"):
            continue
        looks_local = value.startswith(("/", "./", "../", "~")) or value.endswith(LOCAL_DATA_SUFFIXES)
        if looks_local and not Path(value).expanduser().exists():
            problems.append(f"{key}: no such file or directory: {value}")
    return problems


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: embedded demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=50 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole fine-tuning flow")
    _add_config_args(run)
    run.add_argument("--summary-json", type=Path, default=None, help="write the run summary JSON here")
    check = commands.add_parser(
        "validate-data", help="run the data stage alone: clean.jsonl, quarantine.jsonl, report.json, Data Docs")
    _add_config_args(check)
    check.add_argument("--out", type=Path, required=True, help="output directory (created)")
    show = commands.add_parser("show-config", help="print the validated config as YAML")
    _add_config_args(show)
    promote = commands.add_parser(
        "promote", help="move the champion alias to a version (the old champion becomes 'previous')")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="version number to serve")
    promote.add_argument("--force", action="store_true", help="promote even a version that failed the gate")
    _add_config_args(promote)
    rollback = commands.add_parser("rollback", help="make the previous champion the champion again")
    rollback.add_argument("name", help="registered model name")
    _add_config_args(rollback)
    serve = commands.add_parser(
        "serve", help="serve NAME@ALIAS with OpenAI-compatible /v1/completions, /v1/chat/completions, /health")
    serve.add_argument("model", metavar="NAME@ALIAS", help="e.g. lora-pipeline-demo@champion")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--follow-seconds", type=float, default=10.0,
                       help="check the alias this often and swap to a newly promoted version without dropping "
                       "requests (0: keep serving the version loaded at start)")
    serve.add_argument("--max-queue", type=int, default=32,
                       help="requests admitted at once (up to --max-batch generate together, the rest wait); "
                       "more get 429")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="greedy requests generated together in one batch at most (1: one at a time)")
    _add_config_args(serve)
    deploy = commands.add_parser(
        "deploy", help="register the deployments of prefect.yaml with the Prefect API (wraps `prefect deploy`)")
    deploy.add_argument("--name", action="append", default=[], metavar="DEPLOYMENT",
                        help="only this deployment (repeatable; default: all of them)")
    return parser


def _tracking_uri(cfg: PipelineConfig) -> str:
    from lora_pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.mlflow, cfg.output_dir)


def _aliases(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """promote / rollback: print the new aliases; exit 1 when the registry refuses."""
    import json

    from lora_pipeline import promotion

    uri = _tracking_uri(cfg)
    try:
        if args.command == "promote":
            result = promotion.promote(uri, args.name, args.version, force=args.force)
        else:
            result = promotion.rollback(uri, args.name)
    except promotion.PromotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"name": args.name, **result, "aliases": promotion.aliases(uri, args.name)}, indent=2))
    return 0


def _serve(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    import ipaddress
    import logging
    from functools import partial

    import uvicorn

    from lora_pipeline.serving import API_KEY_ENV, AliasFollower, build_app, load_version

    api_key = os.environ.get(API_KEY_ENV) or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name: it may resolve beyond this machine
        loopback = False
    if not loopback and api_key is None:
        print(f"error: serving on {args.host} (beyond this machine) needs an API key: export {API_KEY_ENV}; clients "
              "then send Authorization: Bearer <key>", file=sys.stderr)
        return 2
    if args.max_batch < 1:
        print(f"error: --max-batch must be at least 1 (got {args.max_batch})", file=sys.stderr)
        return 2

    for key, value in _PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lora_pipeline").setLevel(logging.INFO)  # "now serving version N" after a promotion
    try:
        source = AliasFollower(_tracking_uri(cfg), args.model, load=partial(load_version, max_batch=args.max_batch))
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = source.current().info["version"]
    following = f", following {args.model} every {args.follow_seconds:g} s" if args.follow_seconds > 0 else ""
    print(f"serving {args.model} (version {version}) on http://{args.host}:{args.port}{following}", flush=True)
    if args.follow_seconds > 0:
        source.follow(args.follow_seconds)
    app = build_app(source, args.model, max_queue=args.max_queue, api_key=api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


#: The repository root: prefect.yaml and the flows' entrypoints are relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def deploy_command(names: list[str]) -> list[str]:
    """The ``prefect deploy`` command for the deployments of ``prefect.yaml`` (all, or those named)."""
    selection = [arg for name in names for arg in ("--name", name)] or ["--all"]
    return [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(REPO_ROOT / "prefect.yaml"),
            *selection]


def _deploy(args: argparse.Namespace) -> int:
    """Run ``prefect deploy`` from the repository root against ``PREFECT_API_URL``; its exit code."""
    import subprocess

    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: start a Prefect server (make up) and export its URL",
              file=sys.stderr)
        return 2
    return subprocess.run(deploy_command(args.name), cwd=REPO_ROOT, check=False).returncode


#: `lora-pipeline run` exit codes: 0 passed and registered; 1 a stage failed; 2 bad config or inputs;
#: 3 the run completed but the gate rejected the candidate (a scheduler can tell "no better model" from a fault).
GATE_REJECTED_EXIT = 3


def _run(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    import json

    problems = missing_inputs(cfg)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        return 2
    for key, value in _PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Imported late: Prefect reads the environment at import. A temporary Prefect server (when no API is
    # configured) starts now and comes up while the preflight runs and the flow's modules import.
    from flows.temporary_api import TemporaryApiStart

    api = TemporaryApiStart()
    from lora_pipeline import stages
    from lora_pipeline.formatting import FormatError

    try:
        stages.preflight(cfg)
    except (FormatError, OSError, ValueError) as exc:  # an untrainable tokenizer, a model that cannot load
        print(f"error: model.name_or_path={cfg.model.name_or_path}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    from flows.finetune import finetune

    from lora_pipeline.run_request import as_worker

    config_path = str(args.config.resolve()) if args.config else None
    if api.started:  # the server takes longer to start than the imports: meanwhile, open the MLflow store
        from lora_pipeline import tracking

        try:
            tracking.open_local_store(tracking.resolve_tracking_uri(cfg.mlflow, cfg.output_dir))
        except Exception:  # noqa: BLE001 - the run's open_tracking_run task reports it, with its retries
            pass
    try:
        api.wait()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if api.address:
        print(f"Prefect: temporary API server on {api.address} for this run only (no UI; it stops when the run ends: "
              "`make up` keeps a server with its UI running)", file=sys.stderr, flush=True)
    try:  # this process is the flow run's worker: its --config, --set and --summary-json are trusted
        with as_worker(config_path, args.overrides, args.summary_json):
            summary = finetune(config_path=config_path)
    except Exception as exc:  # the flow already recorded the failed stage in its summary
        print(f"error: pipeline failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    registered = summary.get("registered_model", {})
    print(json.dumps({
        "run_dir": summary["run_dir"],
        "gate": summary["gate"],
        "eval": summary["eval"],
        "registered_model": registered,
        "registry": summary.get("registry", {}),
    }, indent=2))
    if not summary["gate"]["passed"]:
        failed = [reason for reason in summary["gate"]["reasons"] if reason.startswith("FAIL")]
        print("gate rejected the candidate (registered as an adapter, no alias moved): " + "; ".join(failed),
              file=sys.stderr)
        return GATE_REJECTED_EXIT
    return 0


def _validate_data(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """Exit 0 when the data passes every rule and the GX suite, 1 when it fails, 2 when it cannot be read."""
    import json
    import logging

    problems = missing_inputs(cfg)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        return 2
    from lora_pipeline import stages
    from lora_pipeline.data import DataError
    from lora_pipeline.formatting import FormatError

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lora_pipeline").setLevel(logging.INFO)  # demo-world build and data-stage progress
    try:
        result = stages.check_data(stages.resolve_assets(cfg).config, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FormatError as exc:  # the tokenizer itself cannot be trained on: one line naming the rule
        print(f"error: model.name_or_path={cfg.model.name_or_path}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({
        "success": result.success,
        "n_input": result.n_input,
        "n_clean": result.n_clean,
        "n_quarantined": result.n_quarantined,
        "n_held_out": result.n_held_out,
        "reason_counts": result.reason_counts,
        "failures": result.failures,
        "clean": str(result.clean_path),
        "quarantine": str(result.quarantine_path),
        "held_out": str(result.eval_path) if result.eval_path else None,
        "report": str(result.report_path),
        "data_docs": str(result.data_docs_dir / "index.html") if result.data_docs_dir else None,
    }, indent=2))
    return 0 if result.success else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lora-pipeline`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)  # --help exits here, before any import below
    import logging

    # bitsandbytes warns at import, on CPUs that report AVX-512 bf16, that it cannot fetch an optional kernel
    # from the Hugging Face hub; the pipeline runs offline and bitsandbytes falls back to its built-in kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.command == "deploy":
        return _deploy(args)
    from lora_pipeline.config import ConfigError
    from lora_pipeline.config_files import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    if args.command == "validate-data":
        return _validate_data(args, cfg)
    if args.command in ("promote", "rollback"):
        return _aliases(args, cfg)
    if args.command == "serve":
        return _serve(args, cfg)
    return _run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
