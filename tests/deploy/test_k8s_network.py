"""The NetworkPolicies of every rendering, as a table of connections allowed and denied.

Endpoints are the rendered pods (one per workload, labels and named ports from its template)
and a few outside ones: the ingress controller, KEDA's operator, Prometheus, kube-dns, a pod of
another namespace, addresses on the internet, the cloud metadata address, and PostgreSQL and
RabbitMQ at private addresses outside the cluster (production's). tests/deploy/netpol.py
evaluates; an "allowed" row must hold even where ipBlocks do not match pods, a "denied" row
even where they do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.netpol import Endpoint, Network
from tests.deploy.test_k8s import (
    BASE,
    DEV,
    KUSTOMIZATIONS,
    MONITORED,
    ONE_RUN_PER_POD,
    PROD,
    Obj,
    pod_templates,
    rendering,
)

NAMESPACE = "oa-machine"

OUTSIDE = [
    Endpoint("ingress-controller", "10.244.1.10", "ingress-nginx",
             {"app.kubernetes.io/name": "ingress-nginx"}),
    Endpoint("keda", "10.244.1.11", "keda", {"app": "keda-operator"}),
    Endpoint("prometheus", "10.244.1.12", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
    Endpoint("kube-dns", "10.96.0.10", "kube-system", {"k8s-app": "kube-dns"}),
    Endpoint("other-pod", "10.244.1.13", "default", {"app": "something"}, {"http": 80}),
    Endpoint("internet", "198.51.100.7"),
    Endpoint("internet-v6", "2001:db8::7"),
    Endpoint("metadata", "169.254.169.254"),
    Endpoint("external-postgres", "10.20.0.5"),
    Endpoint("external-rabbitmq", "10.20.0.6"),
]


def endpoints(objects: list[Obj]) -> dict[str, Endpoint]:
    """One pod per workload of `objects` (named by component or app), plus OUTSIDE and, in
    production, cert-manager's ACME solver pod."""
    found: dict[str, Endpoint] = {}
    for index, (_owner, template) in enumerate(pod_templates(objects)):
        labels = template["metadata"]["labels"]
        name = labels.get("app.kubernetes.io/component") or labels["app.kubernetes.io/name"]
        ports = {
            port["name"]: port["containerPort"]
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
        }
        found[name] = Endpoint(name, f"10.244.0.{index + 10}", NAMESPACE, labels, ports)
    found["acme-solver"] = Endpoint(
        "acme-solver", "10.244.0.99", NAMESPACE, {"acme.cert-manager.io/http01-solver": "true"},
    )
    found.update({endpoint.name: endpoint for endpoint in OUTSIDE})
    return found


#: (source, destination, port, protocol) -> allowed, for every rendering; the per-folder
#: tables below add or override rows.
COMMON: dict[tuple[str, str, int, str], bool] = {
    # The webhook: from the ingress controller only.
    ("ingress-controller", "webhook", 8080, "TCP"): True,
    ("internet", "webhook", 8080, "TCP"): False,
    ("other-pod", "webhook", 8080, "TCP"): False,
    ("worker", "webhook", 8080, "TCP"): False,
    ("scheduler", "webhook", 8080, "TCP"): False,
    # The dequeuer's metrics port: from KEDA's operator only (Prometheus: monitoring only).
    ("keda", "dequeuer", 9100, "TCP"): True,
    ("worker", "dequeuer", 9100, "TCP"): False,
    ("prometheus", "dequeuer", 9100, "TCP"): False,
    ("ingress-controller", "dequeuer", 9100, "TCP"): False,
    ("webhook", "scheduler", 9100, "TCP"): False,
    # Nothing reaches the worker.
    ("keda", "worker", 9100, "TCP"): False,
    ("webhook", "worker", 9100, "TCP"): False,
    ("dequeuer", "worker", 9100, "TCP"): False,
    ("ingress-controller", "worker", 9100, "TCP"): False,
    ("prometheus", "worker", 9100, "TCP"): False,
    ("other-pod", "worker", 9100, "TCP"): False,
    # The worker: the internet on any port, not the cluster's pods nor cloud metadata.
    ("worker", "internet", 443, "TCP"): True,
    ("worker", "internet", 80, "TCP"): True,
    ("worker", "internet", 21, "TCP"): True,
    ("worker", "internet", 6080, "TCP"): True,
    ("worker", "internet-v6", 443, "TCP"): True,
    ("worker", "metadata", 80, "TCP"): False,
    ("worker", "other-pod", 80, "TCP"): False,
    ("worker", "scheduler", 9100, "TCP"): False,
    ("worker", "external-postgres", 5432, "TCP"): False,
    # Everyone resolves names.
    ("webhook", "kube-dns", 53, "UDP"): True,
    ("worker", "kube-dns", 53, "UDP"): True,
    ("worker", "kube-dns", 53, "TCP"): True,
    ("scheduler", "kube-dns", 53, "UDP"): True,
    ("dequeuer", "kube-dns", 53, "UDP"): True,
    # The services: HTTPS (S3, GitHub's API), not sources on other ports.
    ("webhook", "internet", 443, "TCP"): True,
    ("dequeuer", "internet", 443, "TCP"): True,
    ("scheduler", "internet", 443, "TCP"): True,
    ("webhook", "internet", 80, "TCP"): False,
    ("scheduler", "internet", 21, "TCP"): False,
    ("webhook", "metadata", 80, "TCP"): False,
    ("webhook", "other-pod", 80, "TCP"): False,
}

#: Production: PostgreSQL and RabbitMQ outside the cluster, at private addresses.
EXTERNAL_INFRASTRUCTURE = {
    ("webhook", "external-postgres", 5432, "TCP"): True,
    ("dequeuer", "external-postgres", 5432, "TCP"): True,
    ("scheduler", "external-postgres", 5432, "TCP"): True,
    ("webhook", "external-rabbitmq", 5672, "TCP"): True,
    ("dequeuer", "external-rabbitmq", 5671, "TCP"): True,
    ("scheduler", "external-rabbitmq", 5672, "TCP"): True,
    ("worker", "external-rabbitmq", 5672, "TCP"): True,
    ("worker", "external-rabbitmq", 5671, "TCP"): True,
}

PRODUCTION = {
    **EXTERNAL_INFRASTRUCTURE,
    # cert-manager's HTTP-01 solver, from the ingress controller only.
    ("ingress-controller", "acme-solver", 8089, "TCP"): True,
    ("internet", "acme-solver", 8089, "TCP"): False,
    ("worker", "acme-solver", 8089, "TCP"): False,
}

DEVELOPMENT = {
    # The in-cluster infrastructure: the services to all three, the worker to RabbitMQ and MinIO.
    ("webhook", "postgres", 5432, "TCP"): True,
    ("dequeuer", "postgres", 5432, "TCP"): True,
    ("scheduler", "postgres", 5432, "TCP"): True,
    ("worker", "postgres", 5432, "TCP"): False,
    ("webhook", "rabbitmq", 5672, "TCP"): True,
    ("dequeuer", "rabbitmq", 5672, "TCP"): True,
    ("scheduler", "rabbitmq", 5672, "TCP"): True,
    ("worker", "rabbitmq", 5672, "TCP"): True,
    ("webhook", "minio", 9000, "TCP"): True,
    ("dequeuer", "minio", 9000, "TCP"): True,
    ("scheduler", "minio", 9000, "TCP"): True,
    ("worker", "minio", 9000, "TCP"): True,
    ("createbucket", "minio", 9000, "TCP"): True,
    ("createbucket", "postgres", 5432, "TCP"): False,
    ("createbucket", "internet", 443, "TCP"): False,
    ("other-pod", "postgres", 5432, "TCP"): False,
    ("other-pod", "rabbitmq", 5672, "TCP"): False,
    ("worker", "rabbitmq", 15672, "TCP"): False,
    ("worker", "minio", 9001, "TCP"): False,
    ("postgres", "internet", 443, "TCP"): False,
    ("rabbitmq", "internet", 443, "TCP"): False,
    ("minio", "webhook", 8080, "TCP"): False,
    ("postgres", "kube-dns", 53, "UDP"): True,
}

MONITORING = {
    # Prometheus scrapes every metrics port, the worker's included, and nothing else.
    ("prometheus", "webhook", 8080, "TCP"): True,
    ("prometheus", "dequeuer", 9100, "TCP"): True,
    ("prometheus", "scheduler", 9100, "TCP"): True,
    ("prometheus", "worker", 9100, "TCP"): True,
    ("prometheus", "worker", 22, "TCP"): False,
}

TABLES: dict[Path, dict[tuple[str, str, int, str], bool]] = {
    BASE: {**COMMON, **EXTERNAL_INFRASTRUCTURE},
    PROD: {**COMMON, **PRODUCTION},
    ONE_RUN_PER_POD: {**COMMON, **PRODUCTION},
    MONITORED: {**COMMON, **PRODUCTION, **MONITORING},
    DEV: {**COMMON, **DEVELOPMENT},
}


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_network_policies_allow_and_deny_as_the_table_says(folder: Path) -> None:
    objects = rendering(folder)
    pods = endpoints(objects)
    wrong = []
    for (source, destination, port, protocol), expected in TABLES[folder].items():
        # Allowed must hold where ipBlocks miss pods; denied where they match them.
        network = Network(objects, NAMESPACE, ip_blocks_match_pods=not expected)
        got = network.allowed(pods[source], pods[destination], port, protocol)
        if got != expected:
            wrong.append(f"{source} -> {destination}:{port}/{protocol}: "
                         f"{'allowed' if got else 'denied'}, expected otherwise")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_every_pod_is_under_the_default_deny(folder: Path) -> None:
    objects = rendering(folder)
    network = Network(objects, NAMESPACE)
    for endpoint in endpoints(objects).values():
        if endpoint.namespace == NAMESPACE and endpoint.name != "acme-solver":
            for policy_type in ("Ingress", "Egress"):
                assert network._selecting(endpoint, policy_type), (endpoint.name, policy_type)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda path: path.name)
def test_named_ports_of_policies_exist_on_the_pods_they_name(folder: Path) -> None:
    """A named port that no selected pod declares silently matches nothing."""
    objects = rendering(folder)
    pods = [e for e in endpoints(objects).values() if e.namespace == NAMESPACE]
    network = Network(objects, NAMESPACE)
    from tests.deploy.netpol import matches

    for policy in network.policies:
        for rule in policy["spec"].get("ingress", []):
            selected = [p for p in pods if matches(policy["spec"]["podSelector"], p.labels)]
            for entry in rule.get("ports", []):
                if isinstance(entry.get("port"), str):
                    assert any(entry["port"] in p.ports for p in selected), (
                        policy["metadata"]["name"], entry["port"])
        for rule in policy["spec"].get("egress", []):
            for entry in rule.get("ports", []):
                assert not isinstance(entry.get("port"), str) or any(
                    entry["port"] in p.ports for p in pods
                ), (policy["metadata"]["name"], entry["port"])


def test_the_evaluator_bites() -> None:
    """Without the policies every pair would be allowed: the table is not vacuous."""
    objects = [o for o in rendering(PROD) if o["kind"] != "NetworkPolicy"]
    pods = endpoints(rendering(PROD))
    network = Network(objects, NAMESPACE)
    assert network.allowed(pods["webhook"], pods["worker"], 9100)
    assert network.allowed(pods["worker"], pods["metadata"], 80)
