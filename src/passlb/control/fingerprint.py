"""A ring fingerprint: a short hash that is equal on two nodes exactly when
they send every new flow of a service to the same backend.

What decides a new flow's backend on a node is the hashed fields (affinity),
the jhash seed, the ring size and which backend owns each slot. The
fingerprint covers those and nothing else: backends are named by their frozen
key (not by their position in the config), and backends that own no slot are
left out, so two configs that list the same backends in another order, or
one that keeps an extra weight-0 backend, still agree.
"""

from __future__ import annotations

import functools
import hashlib

from passlb.hashing.maglev import Ring
from passlb.model import Affinity
from passlb.state import ServiceDesired

NO_RING = "none"  # the service drops new flows


def ring_fingerprint(service: ServiceDesired) -> str:
    """16 hex digits (BLAKE2b-64), or "none" when the service has no ring."""
    if service.ring is None:
        return NO_RING
    keys = tuple(b.key for b in service.backends)
    return _fingerprint(service.ring, keys, service.seed, service.service.affinity)


@functools.lru_cache(maxsize=1024)  # rings are cached and immutable; status asks every second
def _fingerprint(ring: Ring, keys: tuple[str, ...], seed: int, affinity: Affinity) -> str:
    owners = sorted((keys[i], i) for i, count in enumerate(ring.counts()) if count)
    rank = [0] * len(keys)
    for position, (_, index) in enumerate(owners):
        rank[index] = position
    canonical = ring.translate(rank, max(1, len(owners)))
    digest = hashlib.blake2b(digest_size=8, person=b"passlb/ringfp")
    header = f"{affinity}\n{seed}\n{len(ring)}\n" + "".join(f"{key}\n" for key, _ in owners)
    digest.update(header.encode())
    digest.update(canonical.to_bytes())
    return digest.hexdigest()
