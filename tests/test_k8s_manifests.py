"""docker/k8s: every manifest validates offline against the Kubernetes schemas
(``kubernetes-validate``, strict: unknown fields are errors), and the parts the schemas
cannot see agree with each other and with the code they name: the Kustomization lists every
manifest, the probes run the real probe module with a timeout inside their own, the Service
targets the container's named ports, the HPA scales the Deployment on the metric the
prometheus-adapter rule defines from Triton's metric names, the ServiceMonitor (a CRD, not
in the schemas) selects the Service and names its metrics port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cxr_sr.builders import probe

K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
KUBERNETES = "1.30.0"  # the oldest release these manifests target; the newest is checked too
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for _, d in _documents()
        if d["kind"] == kind and name in (None, d["metadata"].get("name"))
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("version", [KUBERNETES, kubernetes_validate.latest_version()])
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    checked = 0
    for path, doc in _documents():
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {err.message}")
        checked += 1
    assert checked >= 7  # PVC, Deployment, 2 Services, PDB, HPA, adapter ConfigMap


def test_the_validator_would_catch_a_broken_manifest():
    bad = yaml.safe_load((K8S / "deployment.yaml").read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["timeoutSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest_of_its_folder():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    here = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == here
    images = {i["name"] for i in kustomization["images"]}
    deployment = _one("Deployment")["spec"]["template"]["spec"]
    used = {c["image"] for c in deployment["containers"] + deployment["initContainers"]}
    assert used == images


def test_probes_run_a_real_inference_within_their_timeout():
    container = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = container[kind]
        cmd = p["exec"]["command"]
        assert cmd[:3] == ["python3", "-m", "cxr_sr.builders.probe"], kind
        flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
        assert set(flags) <= {"--url", "--timeout", "--model"}
        assert float(flags["--timeout"]) < p["timeoutSeconds"], kind  # the probe ends first
        assert flags["--url"].endswith(":8000")
    # the module those probes run exists, and refuses what it should
    assert probe.main(["--url", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    done = subprocess.run(
        [sys.executable, "-m", "cxr_sr.builders.probe", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--timeout" in done.stdout


def test_gpu_requests_and_resources():
    spec = _one("Deployment")["spec"]["template"]["spec"]
    for c in spec["containers"] + spec["initContainers"]:
        res = c["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
        assert (
            "memory" in res["requests"] and "memory" in res["limits"] and "cpu" in res["requests"]
        )
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    secret = next(v for v in spec["volumes"] if v["name"] == "admin-key")["secret"]["secretName"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "admin-key")
    assert env["CXR_ADMIN_KEY_FILE"].startswith(mount["mountPath"]) and secret


def test_services_target_the_containers_named_ports():
    deployment = _one("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # docker/entrypoint.sh's
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for name in ("cxr-sr", "cxr-sr-pods"):
        service = _one("Service", name)["spec"]
        assert service["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_servicemonitor_scrapes_the_services_metrics_port():
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _one("Service", "cxr-sr")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    headless = _one("Service", "cxr-sr-pods")
    assert (
        not monitor["spec"]["selector"]["matchLabels"].items()
        <= headless["metadata"]["labels"].items()
    )


def test_hpa_scales_the_deployment_on_the_adapters_queue_metric():
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    deployment = _one("Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    config = yaml.safe_load(_one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    query = rule["metricsQuery"]
    # Triton's metric names and the ensemble's name, as a server reports them
    for name in (
        "nv_inference_queue_duration_us",
        "nv_inference_request_success",
        'model="cxr_sr"',
    ):
        assert name in query
    assert query.count("<<.LabelMatchers>>") == 2 and query.count("<<.GroupBy>>") == 2


@pytest.mark.integration
def test_triton_reports_the_metrics_the_adapter_rule_reads(server):
    """The embedded server's /metrics has the series the rule queries, with the model label
    of the ensemble and of its composing models."""
    import urllib.request

    import numpy as np

    from benchmarks.cost import grpc_call

    grpc_call(server.grpc_url, np.full((1, 1, 16, 16), 0.5, np.float32), {"steps": 1})()
    url = f"http://{server.local_host}:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'nv_inference_request_success{model="cxr_sr"' in text
    assert 'nv_inference_queue_duration_us{model="unet"' in text
    assert 'nv_inference_queue_duration_us{model="cxr_sr"' in text
