"""The deployment manifests in cluster/ (and serve_config.yaml): fast, no Ray cluster.

Every serve config -- the YAML files and the RayService's embedded serveConfigV2 string --
must validate against Ray Serve's own schema (ServeDeploySchema) and its app args against
serve_app.config.AppConfig; the KubeRay and cluster-launcher manifests must have the fields
their tools need; the Grafana dashboard must chart only metrics the app (or Ray Serve) exports.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import metrics
from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
RAYSERVICE = CLUSTER / "rayservice.yaml"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
DASHBOARD = CLUSTER / "grafana_dashboard.json"
IMPORT_PATH = "serve_app.app:build_app"

# Metric names the app defines (serve_app/metrics.py, derived from its metric objects: Ray
# prefixes "ray_", exports a Counter as <name>_total and a Histogram as _bucket/_count/_sum), and
# Ray Serve built-ins. The built-ins may appear with or without the _total suffix (Ray 2.60:
# ray_serve_num_router_requests_total).
def _app_metric_objects():
    return [v for v in vars(metrics).values() if isinstance(v, metrics._Lazy)]


def _exported(m) -> set[str]:
    kind, name = m._args[0], "ray_" + m._args[1]
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


APP_METRIC_OBJECTS = _app_metric_objects()
APP_METRICS = set().union(*(_exported(m) for m in APP_METRIC_OBJECTS))
RAY_METRICS = {"ray_serve_multiplexed_models_unload_counter", "ray_serve_num_router_requests"}
KNOWN_METRICS = APP_METRICS | RAY_METRICS | {f"{m}_total" for m in RAY_METRICS}


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def yaml_files() -> list[Path]:
    return sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("*.yml"), ROOT / "serve_config.yaml"])


def serve_config_files() -> list[Path]:
    return sorted([ROOT / "serve_config.yaml", *CLUSTER.glob("serve_config.*.yaml")])


def rayservice_serve_config() -> dict:
    return yaml.safe_load(load_yaml(RAYSERVICE)["spec"]["serveConfigV2"])


def all_serve_configs() -> list[tuple[str, dict]]:
    out = [(p.relative_to(ROOT).as_posix(), load_yaml(p)) for p in serve_config_files()]
    out.append(("cluster/rayservice.yaml#serveConfigV2", rayservice_serve_config()))
    return out


SERVE_CONFIGS = all_serve_configs()
SERVE_IDS = [name for name, _ in SERVE_CONFIGS]


# ---------------------------------------------------------------------------- all YAML parses


def test_expected_files_exist():
    for name in ("rayservice.yaml", "ray-cluster.yaml", "serve_config.gpu.yaml", "serve_config.multinode.yaml",
                 "multinode_local.sh", "Dockerfile", "grafana_dashboard.json", "README.md"):
        assert (CLUSTER / name).is_file(), name


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses_to_a_mapping(path):
    data = load_yaml(path)
    assert isinstance(data, dict) and data, f"{path} is empty or not a mapping"


# ------------------------------------------------------------------------------ serve configs


@pytest.mark.parametrize("name,cfg", SERVE_CONFIGS, ids=SERVE_IDS)
def test_serve_config_validates_against_ray_serve_schema(name, cfg):
    schema = ServeDeploySchema.model_validate(cfg)
    assert len(schema.applications) == 1, name
    app = schema.applications[0]
    assert app.import_path == IMPORT_PATH
    assert app.name == "lora-app" and app.route_prefix == "/"


@pytest.mark.parametrize("name,cfg", SERVE_CONFIGS, ids=SERVE_IDS)
def test_serve_config_args_validate_against_app_config(name, cfg):
    (app,) = cfg["applications"]
    args = AppConfig.model_validate(app["args"])
    assert args.model_dump(exclude_unset=True).keys() == app["args"].keys()


@pytest.mark.parametrize("name,cfg", SERVE_CONFIGS, ids=SERVE_IDS)
def test_bad_args_are_caught_by_app_config(name, cfg):
    """The args check above can fail: a typo'd key is refused (extra='forbid')."""
    args = {**cfg["applications"][0]["args"], "lora_replica": 2}
    with pytest.raises(ValueError, match="lora_replica"):
        AppConfig.model_validate(args)


def test_ray_serve_schema_check_can_fail():
    """The schema check above can fail (a missing import_path, an unknown proxy_location)."""
    cfg = copy.deepcopy(SERVE_CONFIGS[0][1])
    del cfg["applications"][0]["import_path"]
    with pytest.raises(ValueError, match="import_path"):
        ServeDeploySchema.model_validate(cfg)
    cfg = copy.deepcopy(SERVE_CONFIGS[0][1])
    cfg["proxy_location"] = "Nowhere"
    with pytest.raises(ValueError, match="proxy_location"):
        ServeDeploySchema.model_validate(cfg)


GPU_CONFIGS = [c for c in SERVE_CONFIGS if c[0] in ("cluster/serve_config.gpu.yaml", "cluster/rayservice.yaml#serveConfigV2")]


@pytest.mark.parametrize("name,cfg", GPU_CONFIGS, ids=[n for n, _ in GPU_CONFIGS])
def test_gpu_serve_configs_use_a_real_model_on_gpus(name, cfg):
    args = AppConfig.model_validate(cfg["applications"][0]["args"])
    assert args.base_model == "/models/Llama-2-7b-hf" and args.adapters == "/adapters"
    assert args.lora_num_gpus == 1 and args.dtype == "bfloat16"
    assert args.lora_replicas == 2 and args.router_replicas == 2
    assert args.max_adapters_per_replica == 32


def test_gpu_serve_config_file_matches_rayservice():
    """serve deploy after `ray up` and the RayService deploy the same application."""
    assert len(GPU_CONFIGS) == 2
    gpu = load_yaml(CLUSTER / "serve_config.gpu.yaml")
    assert gpu["applications"] == rayservice_serve_config()["applications"]


def test_multinode_config_forces_one_lora_replica_per_node():
    """multinode_local.sh gives each of its two nodes 1 CPU: two LoRA replicas must not fit on
    one node, while a LoRA replica and the Router must; HTTP on 8001, proxy on the head only."""
    cfg = load_yaml(CLUSTER / "serve_config.multinode.yaml")
    args = AppConfig.model_validate(cfg["applications"][0]["args"])
    script = (CLUSTER / "multinode_local.sh").read_text()
    node_cpus = [float(n) for n in re.findall(r"--num-cpus=([\d.]+)", script)]
    assert len(node_cpus) == 2 and len(set(node_cpus)) == 1, node_cpus
    per_node = node_cpus[0]
    assert args.base_model == "demo" and args.lora_replicas == 2 and args.lora_num_gpus == 0
    assert 2 * args.lora_num_cpus > per_node, "two LoRA replicas would fit on one node"
    assert args.lora_num_cpus + args.router_replicas * args.router_num_cpus <= per_node
    assert args.lora_replicas * args.lora_num_cpus + args.router_replicas * args.router_num_cpus <= sum(node_cpus)
    assert cfg["http_options"]["port"] == 8001 and cfg["proxy_location"] == "HeadOnly"
    assert '"node_a": 1' in script and '"node_b": 1' in script
    for port in ("6390", "8275", ":8000"):  # deploy_local.sh's ports
        assert port not in re.sub(r"#.*", "", script), port


# -------------------------------------------------------------------------------- RayService


def rayservice() -> dict:
    return load_yaml(RAYSERVICE)


def test_rayservice_top_level():
    rs = rayservice()
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert rs["metadata"]["name"]
    assert isinstance(rs["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML *string*"
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == "2.60.0"
    assert rc["enableInTreeAutoscaling"] is True


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "no containers"
    return containers


def _check_group(group: dict) -> None:
    assert isinstance(group["rayStartParams"], dict)
    # KubeRay passes rayStartParams to `ray start` as strings.
    assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    for c in _containers(group):
        assert c["name"] and c["image"]
        assert re.match(r"^[\w./-]+/[\w.-]+:2\.60\.0", c["image"]), f"image {c['image']} is not Ray 2.60.0"
        for kind in ("requests", "limits"):
            assert c["resources"][kind]["cpu"] and c["resources"][kind]["memory"], (c["name"], kind)


def test_rayservice_head_group():
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    _check_group(head)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (c,) = _containers(head)
    assert c["name"] == "ray-head"
    assert "nvidia.com/gpu" not in c["resources"]["limits"], "the head group is CPU-only"


def test_rayservice_gpu_worker_group():
    groups = rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g))]
    assert len(gpu) == 1, "exactly one GPU worker group"
    (g,) = gpu
    _check_group(g)
    assert g["groupName"]
    assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    args = AppConfig.model_validate(rayservice_serve_config()["applications"][0]["args"])
    gpus_per_pod = int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert int(_containers(g)[0]["resources"]["requests"]["nvidia.com/gpu"]) == gpus_per_pod == 1
    assert g["maxReplicas"] * gpus_per_pod >= args.lora_replicas * args.lora_num_gpus, "max GPU pods can't hold the LoRA replicas"
    # The workers run the replicas: they need the model and the adapters where the args point.
    spec = g["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    assert args.base_model.startswith("/models/") and args.adapters == "/adapters"
    assert {"/models", "/adapters"} <= set(mounts)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in ("/models", "/adapters"):
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]


# -------------------------------------------------------------------------- cluster launcher


def launcher() -> dict:
    return load_yaml(LAUNCHER)


def test_launcher_fields():
    c = launcher()
    assert c["cluster_name"]
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    assert c["auth"]["ssh_user"]
    assert isinstance(c["max_workers"], int) and c["max_workers"] >= 1
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    for name, t in types.items():
        assert t["node_config"]["InstanceType"], name
        assert "CPU" in t["resources"], name
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"]
    assert any("pip install" in cmd for cmd in c["setup_commands"])
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in c["worker_start_ray_commands"])


def test_launcher_validates_against_ray_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))
    bad = launcher()
    bad["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------------------------- Grafana


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for sub in [p, *p.get("panels", [])]:
            for t in sub.get("targets", []):
                out.append((sub["title"], t["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    # A PromQL identifier followed by a selector, a range or a closing paren; excludes
    # functions (followed by "(") and label names inside {...} or by (...).
    no_labels = re.sub(r"\{[^}]*\}", "{}", expr)
    no_groupings = re.sub(r"\b(by|without)\s*\([^)]*\)", "", no_labels)
    return {m for m in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*(?=[{\[)])", no_groupings) if m.startswith("ray_")}


def test_dashboard_parses_and_charts_known_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["panels"]
    exprs = dashboard_exprs()
    assert exprs
    used = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= KNOWN_METRICS, f"panel {title!r}: unknown metrics {names - KNOWN_METRICS}"
        used |= names
    # Every app metric object (promotions and demotions included) and both Ray built-ins are
    # charted somewhere, under one of its exported names.
    assert len(APP_METRIC_OBJECTS) >= 9
    uncharted = [m._args[1] for m in APP_METRIC_OBJECTS if not _exported(m) & used]
    assert not uncharted, uncharted
    for m in (metrics.PROMOTIONS, metrics.DEMOTIONS):
        assert _exported(m) <= used, m._args[1]
    for m in RAY_METRICS:
        assert m in used or f"{m}_total" in used, m
    histos = [e for _, e in exprs if "_bucket" in e]
    assert histos and all("histogram_quantile" in e and "le" in e for e in histos)


def test_metric_name_extraction_rejects_unknown_metrics():
    """The dashboard check above can fail: an unknown metric is found, functions/labels aren't."""
    names = metric_names('sum by (adapter) (rate(ray_serve_app_typo_total{adapter=~"x"}[5m]))')
    assert names == {"ray_serve_app_typo_total"} and not names <= KNOWN_METRICS
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(ray_serve_app_ttft_seconds_bucket[5m])))") == {
        "ray_serve_app_ttft_seconds_bucket"}


# ------------------------------------------------------------ admin copy sources (issue 10)


@pytest.mark.parametrize("name,cfg", SERVE_CONFIGS, ids=SERVE_IDS)
def test_serve_configs_restrict_admin_copy_sources(name, cfg):
    """POST /admin/adapters reads any URI or router-local path unless store.allowed_source_prefixes
    is set: every shipped config sets it, and each prefix ends with '/' so that
    's3://b/uploads' cannot also admit 's3://b/uploads-of-someone-else'."""
    args = AppConfig.model_validate(cfg["applications"][0]["args"])
    prefixes = args.store.allowed_source_prefixes
    assert prefixes, f"{name}: store.allowed_source_prefixes is not set"
    for p in prefixes:
        assert p.endswith("/") and ".." not in p, f"{name}: prefix {p!r} must be a folder ending in '/'"
        assert not p.startswith(("/etc", "/root", "/home", "/var", "~")), f"{name}: {p!r} exposes the node"


# ------------------------------------------------------------ dashboard auth (issue 25, part 10)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _env_names(group: dict) -> set[str]:
    return {e["name"] for c in _containers(group) for e in c.get("env", [])}


def rayservice_dashboard_problems(rs: dict) -> list[str]:
    rc = rs["spec"]["rayClusterConfig"]
    auth = rc.get("authOptions") or {}
    problems = []
    if auth.get("mode") != "token":
        problems.append(f"authOptions {auth!r}: the dashboard is open to the pod network")
    if auth.get("enableK8sTokenAuth"):
        problems.append("enableK8sTokenAuth: KubeRay does not support K8s-delegated token auth for a RayService")
    if _version(rc["rayVersion"]) < (2, 52, 0):
        problems.append(f"rayVersion {rc['rayVersion']}: Ray token auth needs Ray >= 2.52")
    for group in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
        hand_set = _env_names(group) & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
        if hand_set:
            problems.append(f"{sorted(hand_set)} set by hand: the operator sets them from its token Secret")
    return problems


def test_rayservice_dashboard_requires_a_token():
    """The head's dashboard listens on 0.0.0.0 and its job API runs any code: KubeRay's token
    auth must be on (authOptions.mode: token, KubeRay >= v1.5.1 with Ray >= 2.52), in the mode
    KubeRay supports for a RayService (no enableK8sTokenAuth), and no container may set Ray's
    auth variables by hand (the operator sets them from the Secret it generates)."""
    rs = rayservice()
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert rayservice_dashboard_problems(rs) == []


def _start_commands(cfg: dict) -> list[tuple[str, str]]:
    return [(key, cmd) for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for cmd in cfg[key] if "ray start" in cmd]


def launcher_dashboard_problems(cfg: dict) -> list[str]:
    problems = []
    starts = _start_commands(cfg)
    if {k for k, _ in starts} != {"head_start_ray_commands", "worker_start_ray_commands"}:
        problems.append("no `ray start` line for the head or the workers")
    for key, cmd in starts:
        if not re.search(r"(^|[;&|\s])(export\s+)?RAY_AUTH_MODE=token\b[^;]*\bray start\b", cmd):
            problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token: {cmd!r}")
        if re.search(r"RAY_AUTH_MODE=(?!token\b)", cmd):
            problems.append(f"{key}: RAY_AUTH_MODE set to something other than token: {cmd!r}")
    # Every node reads the token from Ray's default path; the source is the user's own token file,
    # never a file in the repository (file_mounts "." would otherwise carry it too).
    mounts = cfg.get("file_mounts") or {}
    src = mounts.get("~/.ray/auth_token")
    if not src:
        problems.append("file_mounts does not put a token at ~/.ray/auth_token on the nodes")
    elif not src.startswith("~/"):
        problems.append(f"the token comes from {src!r}: keep it outside the repository (~/.ray/auth_token)")
    return problems


def test_launcher_dashboard_requires_a_token():
    """The launcher's head starts its dashboard on 0.0.0.0: every node must start Ray with
    RAY_AUTH_MODE=token and the same token (the user's ~/.ray/auth_token, mounted on every
    node), and the README's commands for that cluster must send it."""
    cfg = launcher()
    assert any("--dashboard-host=0.0.0.0" in cmd for cmd in cfg["head_start_ray_commands"])
    assert launcher_dashboard_problems(cfg) == []
    readme = (CLUSTER / "README.md").read_text()
    section = readme.split("## VMs with the Ray cluster launcher", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if re.match(r"^(RAY_AUTH_MODE=\S+ )?serve (deploy|status)", line):
            assert line.startswith("RAY_AUTH_MODE=token "), f"cluster/README.md: {line!r} sends no token"
    assert "ray get-auth-token --generate" in section


def test_dashboard_auth_checks_can_fail():
    """The checks above catch a config without token auth."""
    for change in (lambda rc: rc.pop("authOptions"), lambda rc: rc["authOptions"].update(mode="disabled"),
                   lambda rc: rc["authOptions"].update(enableK8sTokenAuth=True),
                   lambda rc: rc.update(rayVersion="2.51.0"),
                   lambda rc: _containers(rc["headGroupSpec"])[0].setdefault("env", []).append(
                       {"name": "RAY_AUTH_MODE", "value": "disabled"})):
        rs = rayservice()
        change(rs["spec"]["rayClusterConfig"])
        assert rayservice_dashboard_problems(rs), change
    bad = launcher()
    bad["head_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "") for c in bad["head_start_ray_commands"]]
    assert any("head_start_ray_commands" in p for p in launcher_dashboard_problems(bad))
    bad = launcher()
    bad["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
                                        for c in bad["worker_start_ray_commands"]]
    assert any("worker_start_ray_commands" in p for p in launcher_dashboard_problems(bad))
    bad = launcher()
    bad["file_mounts"] = {k: v for k, v in bad["file_mounts"].items() if k != "~/.ray/auth_token"}
    assert any("~/.ray/auth_token" in p for p in launcher_dashboard_problems(bad))
