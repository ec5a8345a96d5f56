"""A NetworkPolicy evaluator (networking.k8s.io/v1) over rendered objects, for tests.

A connection from one endpoint to another on a port is allowed when the source's egress allows
it (no egress policy selects the source, or one of their rules admits the destination and port)
and the destination's ingress allows it (the same, the other way). Policies only govern pods of
their own namespace; an endpoint elsewhere (another namespace, outside the cluster) is not
restricted by them on its side.

Whether an ``ipBlock`` also matches pod addresses depends on the network plugin (Calico: yes;
Cilium: no). ``ip_blocks_match_pods`` picks one reading: tests check that an allowed pair is
allowed without it and a denied pair is denied with it, so the answer holds for either plugin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """A pod (``namespace`` set) or an address outside the cluster (``namespace`` None)."""

    name: str
    ip: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Named container ports: what a policy's named port resolves to on this pod.
    ports: Mapping[str, int] = field(default_factory=dict)


def matches(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against labels; an empty selector matches everything."""
    if selector is None:
        return True
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def _in_block(ip: str, block: Obj) -> bool:
    address = ipaddress.ip_address(ip)
    network = ipaddress.ip_network(block["cidr"])
    if address.version != network.version or address not in network:
        return False
    return not any(
        address in ipaddress.ip_network(excepted)
        for excepted in block.get("except", [])
        if ipaddress.ip_network(excepted).version == address.version
    )


@dataclass
class Network:
    """The NetworkPolicies of ``objects`` (all in ``namespace`` once rendered)."""

    objects: list[Obj]
    namespace: str
    ip_blocks_match_pods: bool = True

    @property
    def policies(self) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == "NetworkPolicy"]

    def _selecting(self, endpoint: Endpoint, policy_type: str) -> list[Obj]:
        if endpoint.namespace != self.namespace:
            return []
        return [
            policy
            for policy in self.policies
            if policy_type in policy["spec"].get("policyTypes", ["Ingress"])
            and matches(policy["spec"]["podSelector"], endpoint.labels)
        ]

    def _peer_matches(self, peer: Obj, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            if other.namespace is not None and not self.ip_blocks_match_pods:
                return False
            return _in_block(other.ip, peer["ipBlock"])
        if other.namespace is None:
            return False
        if "namespaceSelector" in peer:
            if not matches(peer["namespaceSelector"], _namespace_labels(other.namespace)):
                return False
        elif other.namespace != self.namespace:
            return False
        return matches(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(rule: Obj, destination: Endpoint, port: int, protocol: str) -> bool:
        if not rule.get("ports"):
            return True
        for entry in rule["ports"]:
            if entry.get("protocol", "TCP") != protocol:
                continue
            wanted = entry.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                if destination.ports.get(wanted) == port:
                    return True
            elif wanted <= port <= entry.get("endPort", wanted):
                return True
        return False

    def _admits(
        self, policies: list[Obj], direction: str, other: Endpoint, destination: Endpoint,
        port: int, protocol: str,
    ) -> bool:
        peers_key = "from" if direction == "ingress" else "to"
        for policy in policies:
            for rule in policy["spec"].get(direction, []):
                peers = rule.get(peers_key)
                if (not peers or any(self._peer_matches(p, other) for p in peers)) and (
                    self._port_matches(rule, destination, port, protocol)
                ):
                    return True
        return False

    def allowed(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
    ) -> bool:
        egress = self._selecting(source, "Egress")
        if egress and not self._admits(egress, "egress", destination, destination, port, protocol):
            return False
        ingress = self._selecting(destination, "Ingress")
        return not ingress or self._admits(
            ingress, "ingress", source, destination, port, protocol
        )
