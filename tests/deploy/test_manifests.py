"""deploy/kubernetes: every manifest parses and checks against the Kubernetes API's schema
(the models of the kubernetes_asyncio client, generated from the API's OpenAPI spec: unknown
fields, wrong types and missing required fields fail), and the Deployment is wired to what
`tritonkv serve` really does: its args pass serve's own checks, probes call the supervisor's
health paths on the health port, the metrics port is scraped, the checkpoint is a volume."""

import glob
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml")))
models = pytest.importorskip("kubernetes_asyncio.client.models")
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def build(data, type_name: str, path: str):
    """``data`` as an instance of the API type ``type_name``; raises naming ``path``."""
    if type_name in PRIMITIVES:
        if not isinstance(data, PRIMITIVES[type_name]) or (type_name == "int" and isinstance(data, bool)):
            raise TypeError(f"{path}: expected {type_name}, got {data!r}")
        return data
    if type_name in ("object", "datetime"):
        return data
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(data, list):
            raise TypeError(f"{path}: expected a list")
        return [build(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(data)]
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a mapping")
        return {k: build(v, m.group(1), f"{path}.{k}") for k, v in data.items()}
    cls = getattr(models, type_name)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a {type_name} mapping")
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise KeyError(f"{path}: {type_name} has no field {unknown[0]!r}")
    kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{path}.{k}") for k, v in data.items()}
    return cls(**kwargs)  # the client's setters refuse missing required fields


KINDS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
         ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim"}


def documents():
    docs = []
    for path in MANIFESTS:
        with open(path) as f:
            docs += [(os.path.basename(path), d) for d in yaml.safe_load_all(f) if d]
    return docs


def test_every_manifest_checks_against_the_kubernetes_schema():
    assert MANIFESTS
    kinds = []
    for name, doc in documents():
        type_name = KINDS[(doc["apiVersion"], doc["kind"])]
        build(doc, type_name, f"{name}:{doc['kind']}")
        kinds.append(doc["kind"])
    assert {"Deployment", "Service"} <= set(kinds)


def test_the_checker_refuses_what_the_api_would():
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
            "spec": {"ports": [{"port": 8000}]}}
    build(good, "V1Service", "ok")
    with pytest.raises(KeyError, match="no field 'prot'"):
        build({**good, "spec": {"ports": [{"prot": 8000}]}}, "V1Service", "typo")
    with pytest.raises(TypeError, match="expected int"):
        build({**good, "spec": {"ports": [{"port": "8000"}]}}, "V1Service", "type")
    with pytest.raises(ValueError, match="port"):
        build({**good, "spec": {"ports": [{"name": "http"}]}}, "V1Service", "required")


def test_the_deployment_runs_what_serve_accepts_and_probes_its_health_endpoint():
    from tritonkv.server import cli

    (deployment,) = [d for _, d in documents() if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["spec"]["replicas"] >= 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the args are a valid `tritonkv serve` command line (parsed and checked as serve does)
    parser = cli.argparse.ArgumentParser()
    serve, names = cli.add_serve_parser(parser.add_subparsers())
    args = serve.parse_args(container["args"])
    params = cli.engine_params(args, names, serve)
    given = {n for n in names if getattr(args, f"engine_{n}") is not None}
    assert cli.check_engine_settings(params, None, given) is None
    assert args.host == "0.0.0.0" and args.checkpoint == "/models/checkpoint"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "health": args.health_port, "openai": args.openai_port}
    for probe, path in (("startupProbe", "/health/ready"), ("livenessProbe", "/health/live"),
                        ("readinessProbe", "/health/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == args.metrics_port
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/models/checkpoint"]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.exit_timeout + 1
