"""The team infrastructure files (infra/) parse and agree with each other and with the project.

Docker cannot run here, so these tests check what can be checked without it: the compose file's
services, ports, environment and volumes; the environment variable names against the libraries
that read them; the training image against pyproject.toml and uv.lock; the Kubernetes work-pool
template rendered by Prefect's own Kubernetes worker classes; the DVC remote script run by DVC;
the Prefect deployments against the flow's real signature.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _default(value: str) -> str:
    """Resolve ``${VAR:-default}`` to its default, as compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _published(service: dict) -> dict[int, int]:
    return {int(p.split(":")[1]): int(p.split(":")[0]) for p in service.get("ports", [])}


def test_compose_services_and_ports(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server",
                             "prefect-worker"}
    mlflow_cmd = services["mlflow"]["command"]
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == "5000"
    assert 5000 in _published(services["mlflow"])
    assert _env(services["prefect-server"])["PREFECT_SERVER_API_PORT"] == "4200"
    assert 4200 in _published(services["prefect-server"])
    assert 9000 in _published(services["minio"])
    # clients inside the compose network reach the servers by service name and container port
    worker = _env(services["prefect-worker"])
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "distillery-gpu" in services["prefect-worker"]["command"]
    assert services["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"] == ["gpu"]


def test_compose_variables_volumes_and_files(compose):
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
        build = service.get("build")
        if build:
            dockerfile = build.get("dockerfile", "Dockerfile")
            assert (INFRA / build["context"] / dockerfile).exists(), name


def test_databases_and_buckets_agree(compose):
    services = compose["services"]
    created = set(re.findall(r"CREATE DATABASE (\w+);",
                             (INFRA / "postgres/init-databases.sql").read_text()))
    mlflow_db = _env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    prefect_db = _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert mlflow_db.startswith("postgresql://") and prefect_db.startswith("postgresql+asyncpg://")
    assert {mlflow_db.rsplit("/", 1)[1], prefect_db.rsplit("/", 1)[1]} == created
    assert "-d mlflow" in " ".join(services["postgres"]["healthcheck"]["test"])
    buckets = _env(services["minio-init"])
    artifacts = _default(_env(services["mlflow"])["MLFLOW_ARTIFACTS_DESTINATION"])
    assert artifacts == f"s3://{_default(buckets['MLFLOW_BUCKET'])}/artifacts"
    script = (INFRA / "dvc/add-remote.sh").read_text()
    assert f'BUCKET="${{DVC_BUCKET:-{_default(buckets["DVC_BUCKET"])}}}"' in script
    assert "psycopg2" in (INFRA / "mlflow/Dockerfile").read_text()


def test_environment_names_are_read_by_the_project_or_its_libraries(compose):
    from mlflow import environment_variables
    from mlflow.cli import server
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    prefect_names = _get_valid_setting_names(Settings)
    mlflow_names = {p.envvar for p in server.params if p.envvar} | {
        n for n in dir(environment_variables) if n.startswith("MLFLOW_")}
    source = "\n".join(p.read_text() for d in ("components", "pipeline")
                       for p in (ROOT / d).rglob("*.py"))
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        for key in _env(compose["services"][name]):
            if key.startswith("PREFECT_"):
                assert key in prefect_names, f"{name}: {key} is not a Prefect setting"
            elif key.startswith("MLFLOW_") and key != "MLFLOW_TRACKING_URI":
                assert key in mlflow_names, f"{name}: {key} is not read by MLflow"
            elif key.startswith("DISTILLERY_") and key != "DISTILLERY_GIT_URL":
                assert f'"{key}"' in source, f"{name}: {key} is not read by the project"
    # the registry store honours the tracking server setting the workers get
    assert 'os.environ.get("MLFLOW_TRACKING_URI")' in (
        ROOT / "components/registry/store.py").read_text()


def test_training_image_matches_the_lock_file():
    dockerfile = (INFRA / "train/Dockerfile").read_text()
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {p["name"]: p["version"] for p in lock["package"]}
    cuda_major = versions["nvidia-cuda-runtime"].split(".")[0]
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith(f"nvidia/cuda:{cuda_major}."), (base, cuda_major)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "uv python install 3.11" in dockerfile and "3.11" in requires
    assert "uv sync --frozen" in dockerfile
    ignore = (INFRA / "train/Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
            assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} excluded from context"


def _render_k8s_job(gpus: int, template_file: str = "gpu-job-template.json", **values) -> dict:
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "k8s" / template_file).read_text())
    props = template["variables"]["properties"]
    values = ({k: v["default"] for k, v in props.items() if "default" in v}
              | {"gpu_count": gpus} | values)
    config = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"],
                                                             values))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly"))
    return config.job_manifest


@pytest.mark.parametrize("template_file", ["gpu-job-template.json",
                                           "multinode-job-template.json"])
def test_k8s_template_extends_the_worker_default(template_file):
    from prefect_kubernetes.worker import KubernetesWorker

    template = json.loads((INFRA / "k8s" / template_file).read_text())
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    props = template["variables"]["properties"]
    missing = set(default["variables"]["properties"]) - set(props) - {"cpu_limit"}
    assert not missing, f"worker variables missing: {missing}"
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(props), placeholders - set(props)


def test_k8s_job_requests_gpus():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://prefect-server:4200/api"}):
        manifest = _render_k8s_job(gpus=4)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["image"] == "distillery/train:latest"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"].endswith(":5000")
    assert "PREFECT__FLOW_RUN_ID" in env
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["restartPolicy"] == "Never"


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of an env value (variables defined before it)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_k8s_multinode_job_runs_one_torchrun_rendezvous_over_its_nodes(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from torch.distributed.run import get_args_parser

    from pipeline.launch import torchrun_command

    with temporary_settings({PREFECT_API_URL: "http://prefect-server:4200/api"}):
        manifest = _render_k8s_job(4, "multinode-job-template.json", nodes=3,
                                   rendezvous_port=29500, rendezvous_service="rdzv")
    manifest = yaml.safe_load(yaml.safe_dump(manifest))  # as kubectl reads it
    spec = manifest["spec"]
    pod, container = spec["template"]["spec"], spec["template"]["spec"]["containers"][0]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert pod["subdomain"] == "rdzv"
    assert spec["template"]["metadata"]["labels"]["distillery/rendezvous"] == "rdzv"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29500}]
    assert all(isinstance(e["value"], str) for e in container["env"] if "value" in e)
    # the environment as Kubernetes resolves it in the pods of a job named nightly-x7k2p
    env = {"JOB_NAME": "nightly-x7k2p"}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = _expand(entry["value"], env)
    assert "PREFECT__FLOW_RUN_ID" in env
    for key in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(key)
    for key in (k for k in env if k.startswith("PET_")):
        monkeypatch.setenv(key, env[key])
    # pod 0 runs the flow (the worker's command), whose distill stage launches torchrun; the
    # other pods run torchrun's worker of the distill stage: both join one rendezvous
    shell, flag, script, name, *flow_command = [*container["command"], *container["args"]]
    assert flow_command[:3] == ["prefect", "flow-run", "execute"]
    worker = shlex.split(script.split("exec python ", 1)[1])
    assert worker[:2] == ["-m", "torch.distributed.run"]
    launched = torchrun_command("pipeline.stages.distill", Path("."), 4)
    for argv in (worker[2:], launched[3:]):
        args = get_args_parser().parse_args(argv)  # torchrun's own parser, PET_* defaults
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint,
                args.rdzv_id) == ("3:3", "4", "c10d", "nightly-x7k2p-0.rdzv:29500",
                                  "nightly-x7k2p")
        assert "join_timeout=7200" in args.rdzv_conf and not args.standalone
        assert args.module and args.training_script == "pipeline.stages.distill"
    first = subprocess.run([shell, flag, script, name, "echo", "the flow run"], text=True,
                           env={"JOB_COMPLETION_INDEX": "0", "PATH": "/usr/bin:/bin"},
                           capture_output=True, check=True)
    assert first.stdout == "the flow run\n"


def test_k8s_rendezvous_service_names_the_multinode_pods():
    service = yaml.safe_load((INFRA / "k8s/rendezvous-service.yaml").read_text())
    props = json.loads((INFRA / "k8s/multinode-job-template.json").read_text())[
        "variables"]["properties"]
    name = props["rendezvous_service"]["default"]
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == name
    assert service["spec"]["selector"] == {"distillery/rendezvous": name}
    assert service["spec"]["ports"][0]["port"] == props["rendezvous_port"]["default"]
    with_defaults = _render_k8s_job(1, "multinode-job-template.json")
    assert with_defaults["spec"]["template"]["metadata"]["labels"][
        "distillery/rendezvous"] == name


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_dvc_remote_script_configures_dvc(tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1",
           "DVC_S3_ENDPOINT": "http://store.internal:9000"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["sh", str(INFRA / "dvc/add-remote.sh")], cwd=tmp_path, check=True, env=env,
                   capture_output=True)
    config = configparser.ConfigParser()
    config.read(tmp_path / ".dvc/config")
    assert config["core"]["remote"] == "team"
    remote = config["'remote \"team\"'"]  # DVC's section name, quotes included
    assert remote["url"] == "s3://distillery-dvc/cache"
    assert remote["endpointurl"] == "http://store.internal:9000"
    assert "access_key" not in " ".join(remote)  # credentials come from the environment


def test_prefect_deployments_match_the_flow_and_pools(compose):
    import prefect
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert spec["prefect-version"] == prefect.__version__
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools == {"distillery-k8s", "distillery-k8s-multinode", "distillery-gpu"}
    worker_cmd = compose["services"]["prefect-worker"]["command"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] == "distillery-gpu"
    guide = (INFRA / "README.md").read_text()
    assert "create distillery-k8s --type kubernetes" in guide
    assert "--base-job-template infra/k8s/gpu-job-template.json" in guide
    assert "--base-job-template infra/k8s/multinode-job-template.json" in guide
    templates = {"distillery-k8s": "gpu-job-template.json",
                 "distillery-k8s-multinode": "multinode-job-template.json"}
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        pool = deployment["work_pool"]["name"]
        if pool in templates:
            props = json.loads((INFRA / "k8s" / templates[pool]).read_text())
            assert set(deployment["work_pool"]["job_variables"]) <= set(
                props["variables"]["properties"])
