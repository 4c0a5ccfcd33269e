"""Where would a new flow go? The operator's query, answered from a desired state.

The slot is computed with the same hash the kernel uses (``hashing.jhash``,
proven against nft in tests/kernel/test_jhash_kernel.py) over the same fields
(``hashing.flowkey``), so the answer is what the data plane does — for a NEW
flow. An established flow keeps the backend recorded in the flow table, even
when the ring has changed since it began.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import ip_address

from passlb.hashing.flowkey import L4PROTO, hash_fields, hash_key_bytes
from passlb.hashing.jhash import jhash, reciprocal_scale
from passlb.model import Balance, IPAddress, Mode
from passlb.state import BackendDesired, DesiredState, ServiceDesired


@dataclass(frozen=True)
class Explanation:
    src_ip: IPAddress
    src_port: int
    dst_ip: IPAddress
    dst_port: int
    proto: str
    service: str | None  # None: no service matches the flow
    reason: str  # one sentence: the outcome and why
    hashed_fields: tuple[str, ...] = ()  # nft expressions, in hash order
    key: bytes = b""  # the bytes hashed
    seed: int | None = None
    hash_value: int | None = None  # jhash(key, seed), before scaling to the ring
    slot: int | None = None
    ring_size: int | None = None
    backend: BackendDesired | None = None
    backend_port: int | None = None  # the port the backend sees

    def __str__(self) -> str:
        flow = (
            f"{_endpoint(self.src_ip, self.src_port)} -> "
            f"{_endpoint(self.dst_ip, self.dst_port)} {self.proto}"
        )
        lines = [f"flow     {flow} (a NEW flow; established flows keep their backend)"]
        if self.service is not None:
            lines.append(f"service  {self.service}")
        if self.hash_value is not None:
            fields = " . ".join(self.hashed_fields)
            lines.append(f"hash     jhash({fields}) = {self.key.hex(' ', 4)}")
            lines.append(f"         seed {self.seed:#010x} -> {self.hash_value:#010x}")
            lines.append(f"slot     {self.slot} of {self.ring_size}")
        if self.backend is not None:
            target = _endpoint(self.backend.address, self.backend_port)
            lines.append(
                f"backend  {self.backend.key} -> {target}"
                f" ({self.backend.role}, weight {self.backend.weight})"
            )
        lines.append(f"result   {self.reason}")
        return "\n".join(lines)


def explain_flow(
    state: DesiredState,
    src_ip: IPAddress | str,
    src_port: int,
    dst_ip: IPAddress | str,
    dst_port: int,
    proto: str,
) -> Explanation:
    """Which backend a new ``proto`` ("tcp"/"udp") flow from src to dst would reach."""
    src, dst = ip_address(src_ip), ip_address(dst_ip)
    if proto not in L4PROTO:
        raise ValueError(f"proto must be one of {', '.join(L4PROTO)}, not {proto!r}")
    flow = Explanation(src, src_port, dst, dst_port, proto, service=None, reason="")
    if src.version != dst.version:
        reason = f"not balanced: IPv{src.version} client to IPv{dst.version} VIP"
        return replace(flow, reason=reason)
    desired = _matching_service(state, dst, dst_port, proto)
    if desired is None:
        return replace(
            flow, reason=f"no service has VIP {dst} with {proto} port {dst_port}: not balanced"
        )
    service = desired.service
    flow = replace(flow, service=service.name)
    if service.proxy is not None and service.proxy.balance is not Balance.MAGLEV:
        return replace(
            flow,
            reason=f"the proxy picks the backend at connect time ({service.proxy.balance}); "
            "not predictable from the ring",
        )
    fields = hash_fields(service.affinity, dst.version)
    key = hash_key_bytes(service.affinity, src, src_port, dst, dst_port, L4PROTO[proto])
    hashed = jhash(key, desired.seed)
    slot = reciprocal_scale(hashed, service.ring_size)
    flow = replace(
        flow,
        hashed_fields=fields,
        key=key,
        seed=desired.seed,
        hash_value=hashed,
        slot=slot,
        ring_size=service.ring_size,
    )
    if desired.ring is None:
        reason = "dropped: no backend takes new flows (all unhealthy, policy drop)"
        return replace(flow, reason=reason)
    backend = desired.backends[desired.ring[slot]]
    port = dst_port if service.mode is Mode.DSR else backend.port or service.target_port or dst_port
    return replace(
        flow,
        backend=backend,
        backend_port=port,
        reason=f"forwarded to {backend.key} by {service.mode}",
    )


def _matching_service(
    state: DesiredState, dst: IPAddress, dst_port: int, proto: str
) -> ServiceDesired | None:
    return next(
        (
            s
            for s in state.services
            if s.service.vip == dst
            and proto in s.service.protocol.transports
            and dst_port in s.service.ports
        ),
        None,
    )


def _endpoint(address: IPAddress, port: int | None) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if port is None else f"{host}:{port}"
