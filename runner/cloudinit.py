"""cloud-init's NoCloud seed for an instance: an ISO 9660 volume labelled `cidata` holding
`meta-data`, `user-data` and `network-config`, built in memory with pycdlib. Pure.

- `meta-data`: the `instance-id` (stable for an instance name, so that cloud-init's first-boot
  modules run once; a new `instance_id` in the spec makes them run again, as a user expects
  from a re-provisioned instance), the host name, and the SSH keys as `public-keys` (NoCloud
  gives them to the default user, whatever the user-data says).
- `user-data`: the user's, as given, or an empty `#cloud-config`.
- `network-config`: the user's, or version 2 describing each NIC as the runner configured it:
  its address, gateway, MTU and DNS (IPv4 and IPv6) for a tap it serves, DHCP for the others.
Both YAML documents the runner writes are JSON (YAML 1.2 is a superset), so no YAML writer.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pycdlib

from runner import netrules
from runner.spec import InstanceSpec

LABEL = "cidata"
# A name-derived UUID, as KubeVirt derives a VM's firmware UUID: stable for a name.
NAMESPACE = uuid.UUID("6f1d4f3e-8b7a-4c55-9a43-7c0e3a5b2d10")


def instance_id(spec: InstanceSpec) -> str:
    ci = spec.cloud_init
    if ci is not None and ci.instance_id is not None:
        return ci.instance_id
    return f"iid-{uuid.uuid5(NAMESPACE, spec.name)}"


def meta_data(spec: InstanceSpec) -> dict[str, Any]:
    doc: dict[str, Any] = {"instance-id": instance_id(spec)}
    if (name := netrules.hostname(spec.name)) is not None:
        doc["local-hostname"] = name
    keys = spec.cloud_init.ssh_authorized_keys if spec.cloud_init is not None else ()
    if keys:
        doc["public-keys"] = list(keys)
    return doc


def network_config(spec: InstanceSpec) -> dict[str, Any]:
    """Version 2: each NIC matched by its MAC; static as the runner serves it on its tap."""
    ethernets: dict[str, Any] = {}
    for i, nic in enumerate(spec.nics):
        eth: dict[str, Any] = {"match": {"macaddress": spec.mac(i)}, "set-name": f"eth{i}"}
        if nic.makes_tap:
            addresses = [f"{nic.ip}/{nic.prefix}"]
            routes = [{"to": "0.0.0.0/0", "via": str(nic.gateway_address)}]
            guest6, gw6 = spec.guest6(i), nic.gateway6_address
            if guest6 is not None and gw6 is not None:
                addresses.append(f"{guest6}/64")
                routes.append({"to": "::/0", "via": str(gw6)})
            eth.update(addresses=addresses, routes=routes, mtu=nic.link_mtu)
            servers = [*nic.dns, *(nic.dns6 if guest6 is not None else ())]
            if servers or nic.search:
                eth["nameservers"] = {"addresses": servers, "search": list(nic.search)}
        else:  # passt serves DHCP with the pod's addresses; a tap-fd nic is the giver's
            eth.update(dhcp4=True, dhcp6=nic.binding == "passt")
        ethernets[f"nic{i}"] = eth
    return {"version": 2, "ethernets": ethernets}


def seed_files(
    spec: InstanceSpec, user_data: bytes | None, network: bytes | None
) -> dict[str, bytes]:
    """The seed's files; `user_data` and `network` as read from the spec's files (None: not
    given)."""

    def doc(value: object) -> bytes:
        return (json.dumps(value, indent=1) + "\n").encode()

    return {
        "meta-data": doc(meta_data(spec)),
        "user-data": user_data if user_data is not None else b"#cloud-config\n{}\n",
        "network-config": network if network is not None else doc(network_config(spec)),
    }


def iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image labelled `cidata`, the names as given through Rock Ridge and Joliet
    (ISO 9660's own are 8.3 upper case)."""
    image = pycdlib.PyCdlib()
    image.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    try:
        for name, data in files.items():
            short = name.replace("-", "").upper()[:8]
            image.add_fp(
                io.BytesIO(data), len(data), f"/{short}.;1", rr_name=name, joliet_path=f"/{name}"
            )
        out = io.BytesIO()
        image.write_fp(out)
        return out.getvalue()
    finally:
        image.close()
