"""The production definitions under infra/ (Dockerfile, Compose, Kubernetes, the GPU work pool) agree with the
repository, with each other and with Prefect's own validation: everything that can be checked without a
container engine or a cluster."""

from __future__ import annotations

import os
import copy
import json
import re
import shutil
import subprocess
import tomllib
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY")
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?+])[^}]*)?\}")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.$-]+)\s*\}\}")


def _env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (INFRA / "docker" / "Dockerfile").read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def _args() -> dict[str, str]:
    return dict(arg.split("=", 1) for name, arg in _dockerfile() if name == "ARG" and "=" in arg)


def _compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _template() -> dict:
    return json.loads((K8S / "work-pool-gpu.json").read_text())


def _k8s_objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _pod_specs() -> list[dict]:
    specs = []
    for obj in _k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append(obj["spec"]["template"]["spec"])
    return specs


def _is_our_image(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return name.rsplit("/", 1)[-1] == "lora-pipeline" and tag.startswith(VERSION)


def test_every_yaml_and_json_under_infra_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), *INFRA.rglob("*.json")])
    assert {"compose.yaml", "work-pool-gpu.json", "prefect.yaml", "kustomization.yaml"} <= {f.name for f in files}
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else list(yaml.safe_load_all(path.read_text()))
        assert any(docs), f"{path} is empty"


# --- Docker image --------------------------------------------------------------------------------------------

def test_dockerfile_copies_only_existing_sources_that_the_context_keeps():
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    copies = [arg.split() for name, arg in _dockerfile() if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown: extend this test"
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert f"!{source.rstrip('/')}/" in ignore or f"!{source.rstrip('/')}" in ignore, f"{source} is ignored"


def test_dockerfile_command_base_image_user_and_pins():
    instructions = _dockerfile()
    names = [name for name, _ in instructions]
    assert "ENTRYPOINT" not in names  # the Kubernetes Job's args replace CMD: an ENTRYPOINT would prefix them
    command = json.loads(next(arg for name, arg in instructions if name == "CMD"))
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    declared = {re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower() for req in PYPROJECT["project"]["dependencies"]}
    executable = command[0]
    assert executable in PYPROJECT["project"]["scripts"] or scripts[executable].dist.name.lower() in declared
    assert command[:4] == ["prefect", "worker", "start", "--pool"]
    from infra.stack import WORK_POOL  # the process pool `make up` uses

    assert command[command.index("--pool") + 1] == WORK_POOL and command[command.index("--type") + 1] == "process"
    user = [arg for name, arg in instructions if name == "USER"]
    assert user and user[-1] not in ("root", "0")
    args = _args()
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert f"torch=={args['TORCH_VERSION']}" in PYPROJECT["project"]["dependencies"]
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    prefect_versions = {yaml.safe_load((path / "prefect.yaml").read_text())["prefect-version"] for path in (REPO, K8S)}
    assert prefect_versions == {args["PREFECT_VERSION"]}
    assert f"prefect-kubernetes=={args['PREFECT_KUBERNETES_VERSION']}" in PYPROJECT["project"]["optional-dependencies"]["dev"]
    workdir = [arg for name, arg in instructions if name == "WORKDIR"][-1]
    assert workdir == "/opt/lora-pipeline"


def test_dockerfile_bakes_in_the_worker_environment():
    env = " ".join(arg for name, arg in _dockerfile() if name == "ENV")
    baked = dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", env))
    worker_env = _env_file(INFRA / "prefect-worker.env")
    assert worker_env and {key: baked.get(key) for key in worker_env} == worker_env


# --- Docker Compose ------------------------------------------------------------------------------------------

def test_compose_services_dependencies_volumes_and_healthchecks_are_consistent():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "worker"}
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s missing healthcheck"
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert services[target]["restart"] == "no"
        if name != "minio-init":  # a one-shot job: "completed" is its health
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
        if "build" in service:
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            assert _is_our_image(service["image"])
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert used == set(compose["volumes"])
    worker = services["worker"]["command"]
    assert worker[worker.index("--pool") + 1] == "lora-pipeline" and "--with-healthcheck" in worker
    assert services["mlflow"]["command"][:3] == ["mlflow", "server", "--serve-artifacts"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert (INFRA / "docker" / "postgres-init.sql").read_text().count("CREATE DATABASE mlflow;") == 1


def test_compose_secrets_come_from_variables_listed_in_the_example_env_file():
    referenced = set(COMPOSE_VAR.findall(json.dumps(_compose())))  # parsed: comments do not count
    example = _env_file(INFRA / "compose.env.example")
    assert referenced and referenced == set(example), (referenced ^ set(example))
    for name, service in _compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert COMPOSE_VAR.fullmatch(str(value)), f"{name}: {key} is a literal, not a ${{VAR}} reference"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_accepts_the_file(tmp_path):
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker client has no compose plugin")
    env = tmp_path / "compose.env"
    env.write_text((INFRA / "compose.env.example").read_text())
    result = subprocess.run(["docker", "compose", "-f", str(INFRA / "compose.yaml"), "--env-file", str(env), "config",
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- The Kubernetes work pool's base job template ------------------------------------------------------------

def _render(values: dict) -> dict:
    """The Job manifest a Kubernetes worker builds for a flow run with these job variables.

    Mirrors ``BaseJobConfiguration.from_template_and_values`` (Prefect 3.9.1: defaults that are not None, then the
    deployment's values, then ``apply_values``) without its API client, which would start a temporary server.
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _template()
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    configuration = apply_values(copy.deepcopy(template["job_configuration"]), {**defaults, **values})
    job = KubernetesWorkerJobConfiguration(**configuration)
    job.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="test-run"))
    return job.job_manifest


def _is_subset(small, large) -> bool:
    if isinstance(small, dict):
        return isinstance(large, dict) and all(k in large and _is_subset(v, large[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(large, list) and len(small) == len(large) and all(map(_is_subset, small, large))
    return small == large


def test_work_pool_template_is_prefect_kubernetes_default_plus_gpu_variables():
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    template = _template()
    properties = template["variables"]["properties"]
    assert set(default["variables"]["properties"]) < set(properties)
    assert set(properties) - set(default["variables"]["properties"]) == {"gpu_count", "node_selector", "tolerations",
                                                                        "shm_size", "outputs_claim"}
    for name, schema in default["variables"]["properties"].items():  # same types; only some defaults differ
        assert {k: v for k, v in schema.items() if k not in ("default", "description", "examples")} == \
            {k: v for k, v in properties[name].items() if k not in ("default", "description", "examples")}
    assert _is_subset(default["job_configuration"], template["job_configuration"])
    used = {m for value in template["job_configuration"].values() for m in PLACEHOLDER.findall(json.dumps(value))}
    assert used == set(properties), used ^ set(properties)


def test_work_pool_template_passes_prefect_validation():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import is_valid_schema, validate

    template = _template()
    WorkPoolCreate(name="lora-pipeline-k8s", type="kubernetes", base_job_template=template)
    is_valid_schema(template["variables"], preprocess=False)
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    validate(defaults, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=True)


def test_gpu_job_variables_reach_the_job_manifest():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    manifest = _render({"gpu_count": 2, "node_selector": {"pool": "a100"}, "tolerations": [toleration],
                        "memory_request": "40Gi", "image": "reg.example/lora-pipeline:0.1.0-cuda"})
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"] == {"memory": "40Gi"}
    assert container["image"] == "reg.example/lora-pipeline:0.1.0-cuda"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == [toleration]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"outputs": "/opt/lora-pipeline/outputs", "dshm": "/dev/shm"}
    assert {v["name"] for v in pod["volumes"]} == set(mounts)
    assert pod["securityContext"]["runAsUser"] == int(_args()["APP_UID"])
    assert manifest["metadata"]["namespace"] == "lora-pipeline"


def test_without_gpu_variables_the_job_asks_for_no_gpu():
    pod = _render({})["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert _is_our_image(pod["containers"][0]["image"])


# --- Kubernetes deployments and manifests --------------------------------------------------------------------

def test_k8s_deployments_use_only_the_templates_job_variables():
    from prefect.utilities.schema_tools.validation import validate

    template = _template()
    properties = template["variables"]["properties"]
    declarations = yaml.safe_load((K8S / "prefect.yaml").read_text())
    workdir = [arg for name, arg in _dockerfile() if name == "WORKDIR"][-1]
    assert declarations["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    deployments = {d["name"]: d for d in declarations["deployments"]}
    assert set(deployments) == {"finetune-weekly-gpu", "finetune-gpu", "promote-k8s"}
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "lora-pipeline-k8s"
        variables = deployment["work_pool"]["job_variables"]
        assert set(variables) <= set(properties), set(variables) - set(properties)
        # What the Prefect API checks when the deployment is created (prefect.server.api.validation).
        validate(variables, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
                 allow_none_with_default=True)
        assert _is_our_image(variables["image"])
        path, _, function = deployment["entrypoint"].partition(":")
        assert (REPO / path).is_file() and function
        config = deployment.get("parameters", {}).get("config_path")
        assert config is None or (REPO / config).is_file()
    assert deployments["finetune-gpu"]["work_pool"]["job_variables"]["gpu_count"] == 1
    assert "gpu_count" not in deployments["promote-k8s"]["work_pool"]["job_variables"]


def test_k8s_manifests_have_the_expected_objects_and_images():
    objects = _k8s_objects()
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    assert {("Namespace", "lora-pipeline"), ("StatefulSet", "postgres"), ("StatefulSet", "minio"),
            ("Deployment", "mlflow"), ("Deployment", "prefect-server"), ("Deployment", "prefect-worker"),
            ("ServiceAccount", "prefect-worker"), ("Role", "prefect-worker"), ("RoleBinding", "prefect-worker"),
            ("ConfigMap", "lora-pipeline-flow-run-env"), ("PersistentVolumeClaim", "lora-pipeline-outputs")} <= kinds
    defaults = _template()["variables"]["properties"]
    assert ("PersistentVolumeClaim", defaults["outputs_claim"]["default"]) in kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == defaults["namespace"]["default"]
    pod_labels = [obj["spec"]["template"]["metadata"]["labels"] for obj in objects if "template" in obj.get("spec", {})]
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        assert any(_is_subset(service["spec"]["selector"], labels) for labels in pod_labels), service["metadata"]
    ours = 0
    for spec in _pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            if image.startswith("lora-pipeline"):
                assert _is_our_image(image)
                ours += 1
            else:
                assert ":" in image and not image.endswith(":latest"), f"{image}: pin a tag"
    assert ours == 3  # Prefect server, worker, MLflow
    worker = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "prefect-worker")
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--pool") + 1] == "lora-pipeline-k8s"
    assert command[command.index("--type") + 1] == "kubernetes"
    sql = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "postgres-init")
    assert list(sql["data"].values()) == [(INFRA / "docker" / "postgres-init.sql").read_text()]


def test_k8s_passwords_and_keys_come_from_the_secret():
    generator = yaml.safe_load((K8S / "kustomization.yaml").read_text())["secretGenerator"]
    assert [g["envs"] for g in generator] == [["secrets.env"]]
    keys = set(_env_file(K8S / "secrets.env.example"))
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()
    referenced = set()
    for spec in _pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            from_secret = set()
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == generator[0]["name"] and ref["key"] in keys
                    from_secret.add(env["name"])
                    referenced.add(ref["key"])
                elif SECRET_NAME.search(env["name"]) or env["name"].endswith("_USER"):
                    pytest.fail(f"{container['name']}: {env['name']} is a literal, not a secretKeyRef")
                else:  # a URL with credentials may only expand $(VARS) that came from the Secret
                    credentials = re.search(r"://([^/@]+)@", env.get("value", ""))
                    if credentials:
                        assert set(re.findall(r"\$\((\w+)\)", credentials.group(1))) <= from_secret
                        assert re.fullmatch(r"(\$\(\w+\)):(\$\(\w+\))", credentials.group(1))
    assert referenced == keys


def test_the_stack_prefect_server_waits_longer_for_a_database_connection_unless_told_otherwise():
    """`make up`'s Prefect server: 30 s for a new database connection (Prefect's 5 s timed out under ten runs on
    2 slow cores, and a run's concurrency-slot request got a 500); a timeout the caller set is kept."""
    import subprocess
    import sys

    from infra.stack import SERVER_DATABASE_CONNECTION_TIMEOUT_SECONDS, prefect_server_env

    database, api = "postgresql+asyncpg://root@127.0.0.1:5432/lp_prefect", "http://127.0.0.1:4281/api"
    env = prefect_server_env({"PATH": "/usr/bin"}, database, api)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == database and env["PREFECT_UI_API_URL"] == api
    probe = "from prefect.settings import get_current_settings as s; print(s().server.database.connection_timeout)"
    seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, **{key: value for key, value in env.items() if key.startswith("PREFECT_SERVER")}})
    assert float(seen.stdout.strip()) == SERVER_DATABASE_CONNECTION_TIMEOUT_SECONDS > 5  # what Prefect reads
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "PREFECT_API_DATABASE_CONNECTION_TIMEOUT"):
        kept = prefect_server_env({name: "7"}, database, api)
        assert kept[name] == "7" and sum(key.endswith("DATABASE_CONNECTION_TIMEOUT") for key in kept) == 1
