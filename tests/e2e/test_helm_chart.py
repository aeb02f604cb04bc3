"""The Helm chart (helm/llama4serve) with the real `helm` CLI: lint and render every values file, validate each
rendered object (core kinds with kubernetes-validate, the RayService against the KubeRay CRD schema, its
serveConfigV2 with Ray Serve's and our own config schema), and check that values.schema.json rejects bad values.

helm comes from PATH or .tools/bin (`scripts/install.sh test` puts it there); the KubeRay CRDs from
$KUBERAY_CRD_DIR, default ../shared/kuberay-crds beside the checkout. Missing tools skip, or fail when CI is set.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic v1-style fields

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llama4serve"
PRESETS = ["values.yaml", "values-tiny.yaml", "values-scout.yaml", "values-maverick.yaml"]
K8S_VERSION = "1.33.0"  # one that kubernetes-validate ships schemas for
HEAD_PORTS = {"dashboard": 8265, "metrics": 8080, "serve": 8000, "serve-grpc": 9000, "gcs-server": 6379,
              "client": 10001}
ISSUE_METRICS = ["requests_total", "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_ratio", "expert_tokens_total", "all_to_all_seconds", "actor_restarts_total",
                 "recovery_seconds"]
ALL_OPTIONS = ["--set", "ingress.enabled=true,ingress.host=llm.example.com",
               "--set", "apiKey.existingSecret=,apiKey.value=s3cret",
               "--set", "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
               "--set", "networkPolicy.dashboardNamespaces={ops}"]


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this fails instead of skipping)")
    pytest.skip(what)


@functools.cache
def _helm_path() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    return shutil.which("helm") or (str(local) if os.access(local, os.X_OK) else None)


def helm(*args: str) -> subprocess.CompletedProcess:
    path = _helm_path()
    if path is None:
        _missing("helm not found on PATH or in .tools/bin; run `bash scripts/install.sh test`")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60)


@functools.cache
def render(values_file: str, *extra: str) -> tuple[dict, ...]:
    """`helm template` of the chart with a values file; the rendered objects."""
    out = helm("template", "rel", str(CHART), "--namespace", "llm", "--kube-version", K8S_VERSION,
               "-f", str(CHART / values_file), *extra)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def values(values_file: str) -> dict:
    """The chart's values.yaml with a values file on top (what the templates see)."""
    def merge(base: dict, top: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in top.items()}}

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load((CHART / values_file).read_text()))


def one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """groupName ('head' for the head) -> group spec."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}}


def serve_config(objects) -> dict:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


def app_args(objects) -> dict:
    (app,) = serve_config(objects)["applications"]
    return app["args"]


# --- the KubeRay CRD as a strict JSON Schema -------------------------------------------------------------------

def _json_schema(node: dict) -> dict:
    """A structural OpenAPI v3 schema as JSON Schema: nullable -> type list; closed objects; x-kubernetes-* off."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: _json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_json_schema(s) for s in node[key]]
    return out


@functools.cache
def rayservice_validator():
    import jsonschema

    crd_dir = Path(os.environ.get("KUBERAY_CRD_DIR", REPO.parent / "shared" / "kuberay-crds"))
    crd_file = crd_dir / "ray.io_rayservices.yaml"
    if not crd_file.is_file():
        _missing(f"KubeRay CRD {crd_file} not found (set KUBERAY_CRD_DIR)")
    crd = yaml.safe_load(crd_file.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _json_schema(v1["schema"]["openAPIV3Schema"])
    schema["properties"].update(apiVersion={"const": "ray.io/v1"}, kind={"const": "RayService"})
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft202012Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in rayservice_validator().iter_errors(obj)]


def k8s_validate(obj: dict) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed; run `bash scripts/install.sh test`")
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- lint and render --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values_file", PRESETS)
def test_lint_strict(values_file):
    out = helm("lint", "--strict", str(CHART), "-f", str(CHART / values_file))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values_file", PRESETS)
def test_core_objects_are_valid_kubernetes(values_file):
    kinds = set()
    for objects in (render(values_file), render(values_file, *ALL_OPTIONS)):
        for obj in objects:
            kinds.add(obj["kind"])
            if obj["apiVersion"].split("/")[0] not in ("ray.io", "monitoring.coreos.com"):
                k8s_validate(obj)
        # The pod templates inside the RayService, as Pods.
        for group in pod_templates(one(objects, "RayService")).values():
            template = group["template"]
            k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
                          "spec": template["spec"]})
    assert {"RayService", "Service", "NetworkPolicy", "ConfigMap", "Secret", "Ingress"} <= kinds


@pytest.mark.parametrize("values_file", PRESETS)
def test_rayservice_matches_kuberay_crd(values_file):
    for objects in (render(values_file), render(values_file, *ALL_OPTIONS)):
        assert crd_errors(one(objects, "RayService")) == []


def test_crd_check_is_strict():
    rayservice = json.loads(json.dumps(one(render("values-tiny.yaml"), "RayService")))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 1
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    errors = crd_errors(rayservice)
    assert any("replica" in e for e in errors) and any("num-cpus" in e for e in errors), errors


@pytest.mark.parametrize("values_file", PRESETS)
def test_serve_config_parses(values_file):
    from ray.serve.schema import ServeDeploySchema

    from llama4serve.cluster.serving.serve_config import ServeConfig

    objects = render(values_file)
    config = serve_config(objects)
    assert set(config) <= set(ServeDeploySchema.model_fields), "unknown top-level serveConfigV2 keys"
    deploy = ServeDeploySchema.model_validate(config)
    assert (deploy.http_options.host, deploy.http_options.port, deploy.grpc_options.port) == ("0.0.0.0", 8000, 9000)
    assert deploy.grpc_options.grpc_servicer_functions == [
        "llama4serve.protos.llama4serve_pb2_grpc.add_Llama4ServeServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    ]
    (app,) = deploy.applications
    assert app.import_path == "llama4serve.cluster.app:build_app"
    args = app_args(objects)
    assert "api_key" not in args
    ServeConfig(**args)  # extra="forbid": every key must be a ServeConfig field


def test_schema_args_are_serve_config_fields():
    from llama4serve.cluster.serving.serve_config import ServeConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    listed = set(schema["properties"]["serve"]["properties"]["args"]["properties"])
    assert listed <= set(ServeConfig.model_fields), listed - set(ServeConfig.model_fields)
    assert not listed & {"model", "api_key", "attention_resources", "expert_resources"}, "the chart sets these"


# --- what the presets deploy ------------------------------------------------------------------------------------

def _ray_resources(param: str) -> dict:
    # rayStartParams.resources is a shell word: '"{\"attention_node\":4}"'
    assert param.startswith('"') and param.endswith('"'), param
    return json.loads(param[1:-1].replace('\\"', '"'))


@pytest.mark.parametrize("values_file", PRESETS)
def test_worker_groups_hold_the_topology(values_file):
    objects = render(values_file)
    args, vals = app_args(objects), values(values_file)
    gpu_name = "nvidia.com/gpu"
    groups = pod_templates(one(objects, "RayService"))
    head = groups.pop("head")
    assert head["rayStartParams"]["num-gpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in head_container["ports"]} == HEAD_PORTS
    assert gpu_name not in json.dumps(head_container.get("resources", {}))
    for role in ("attention", "expert"):
        actors = args[f"{role}_actors"] * args["num_replicas"]
        if actors == 0:
            assert role not in groups
            continue
        group = groups[role]
        slots = _ray_resources(group["rayStartParams"]["resources"])
        assert slots == {f"{role}_node": vals["workers"][role]["actorsPerPod"]}
        assert args[f"{role}_resources"] == {f"{role}_node": 1}
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == math.ceil(
            actors / slots[f"{role}_node"])
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"].get(gpu_name, 0))
        assert gpus == math.ceil(slots[f"{role}_node"] * args["num_gpus_per_actor"])
        assert container["resources"]["requests"].get(gpu_name) == container["resources"]["limits"].get(gpu_name)


@pytest.mark.parametrize("values_file, gpus", [("values-scout.yaml", {"attention": [4], "expert": [4]}),
                                               ("values-maverick.yaml", {"attention": [1, 1], "expert": [7, 7]})])
def test_gpu_presets_fill_8_gpu_nodes(values_file, gpus):
    groups = pod_templates(one(render(values_file), "RayService"))
    found = {role: [int(groups[role]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])]
             * groups[role]["replicas"] for role in gpus}
    assert found == gpus
    args = app_args(render(values_file))
    assert args["dtype"] == "bfloat16" and args["num_gpus_per_actor"] == 1
    if values_file == "values-maverick.yaml":  # one attention + one expert pod per node
        assert args["placement_strategy"] == "SPREAD"
        for role in gpus:
            anti = groups[role]["template"]["spec"]["affinity"]["podAntiAffinity"]
            assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


@pytest.mark.parametrize("values_file", PRESETS)
def test_pods_mount_weights_shm_and_api_key(values_file):
    objects = render(values_file)
    vals, args = values(values_file), app_args(objects)
    with_key = bool(vals["apiKey"]["existingSecret"])
    for group in pod_templates(one(objects, "RayService")).values():
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        weights = mounts[args["model"]]
        assert weights["readOnly"] is True
        if "persistentVolumeClaim" in volumes[weights["name"]]:
            assert volumes[weights["name"]]["persistentVolumeClaim"]["readOnly"] is True
        env = {e["name"]: e for e in container.get("env", [])}
        if with_key:
            ref = env["LLAMA4SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": vals["apiKey"]["existingSecret"], "key": vals["apiKey"]["key"]}
        else:
            assert "LLAMA4SERVE_API_KEY" not in env


def test_api_key_value_makes_a_secret():
    objects = render("values-tiny.yaml", *ALL_OPTIONS)
    secret = one(objects, "Secret")
    assert secret["data"] == {"api-key": "czNjcmV0"}  # base64("s3cret")
    (container,) = pod_templates(one(objects, "RayService"))["head"]["template"]["spec"]["containers"]
    (env,) = [e for e in container["env"] if e["name"] == "LLAMA4SERVE_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert "s3cret" not in one(objects, "RayService")["spec"]["serveConfigV2"]


def test_network_policy_opens_only_serving_ports():
    policy = one(render("values-maverick.yaml"), "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        if "from" not in rule:  # open to every source
            assert sorted(p["port"] for p in rule["ports"]) == [8000, 9000]


def test_grafana_dashboard_shows_every_metric():
    objects = render("values.yaml")
    dashboard = json.loads(one(objects, "ConfigMap")["data"]["llama4serve.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert [m for m in ISSUE_METRICS if f"llama4serve_{m}" not in exprs] == []
    assert "heatmap" in {p["type"] for p in dashboard["panels"]}


def test_monitors_scrape_the_metrics_port():
    objects = render("values-tiny.yaml", *ALL_OPTIONS)
    assert one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    assert one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    metrics = one(objects, "Service", "rel-llama4serve-metrics")
    assert metrics["spec"]["ports"][0]["port"] == 8080


# --- values.schema.json rejects bad values ----------------------------------------------------------------------

BAD_VALUES = [
    ("values-maverick.yaml", "serve.args.expert_actors=0", "/serve/args/expert_actors"),
    ("values-scout.yaml", "serve.args.num_gpus_per_actor=eight", "/serve/args/num_gpus_per_actor"),
    ("values-tiny.yaml", "serve.args.num_replicas=-1", "/serve/args/num_replicas"),
    ("values-maverick.yaml", "workers.expert.replicas=-2", "/workers/expert/replicas"),
    ("values-scout.yaml", "weights.source=random", "/weights/source"),
    ("values-scout.yaml", "weights.pvc.claimName=", "/weights/pvc/claimName"),
    ("values-tiny.yaml", "serve.args.api_key=s3cret", "/serve/args"),
]


@pytest.mark.parametrize("values_file, setting, path", BAD_VALUES)
def test_schema_rejects(values_file, setting, path):
    for command in (["lint", "--strict"], ["template", "rel"]):
        out = helm(*command, str(CHART), "-f", str(CHART / values_file), "--set", setting)
        assert out.returncode != 0, f"helm {command[0]} accepted {setting}"
        message = out.stdout + out.stderr
        assert path in message or path.strip("/").replace("/", ".") in message, message  # helm 4 / helm 3 style
