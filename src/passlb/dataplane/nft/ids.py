"""Backend ids: the mark values that name a (service, backend) in the kernel drivers' tables.

Rings, flow tables and conntrack entries hold ids, not addresses, so an id
must mean one backend for as long as anything in the kernel still names it:

- a backend that stays in the desired state keeps its id;
- an id let go (its backend left) is held back from new backends while flow
  entries may still name it: the driver decides when it is free again
  (dsr: once no flow entry carries it; nat: never within a run, since TCP
  conntrack entries of a removed backend live until their connection ends);
- a new backend gets the lowest id that is neither in use nor held.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

Owner = tuple[str, str]  # (service name, backend key)

# Element comments name the owner of an id: "<service>/<backend key>". Backend
# keys never hold "/", so the last "/" splits them.
OWNER_SEP = "/"


def owner_comment(owner: Owner) -> str:
    return f"{owner[0]}{OWNER_SEP}{owner[1]}"


def parse_owner(comment: str | None) -> Owner | None:
    if not comment or OWNER_SEP not in comment:
        return None
    service, key = comment.rsplit(OWNER_SEP, 1)
    return service, key


class BackendIds:
    """Who holds which id (both ways), and which ids are held back."""

    def __init__(self) -> None:
        self._ids: dict[Owner, int] = {}
        self._owners: dict[int, Owner] = {}
        self.held: set[int] = set()  # not given to a new backend (flow entries may name them)

    @property
    def ids(self) -> dict[Owner, int]:
        """Owner -> id (read only: change it through assign and adopt)."""
        return self._ids

    def owner(self, bid: int) -> Owner | None:
        return self._owners.get(bid)

    def adopt(self, owner: Owner, bid: int) -> None:
        """Take over an id a previous run gave (read back from the table)."""
        previous = self._ids.pop(owner, None)
        if previous is not None:
            self._owners.pop(previous, None)
        other = self._owners.pop(bid, None)
        if other is not None:
            self._ids.pop(other, None)
        self._ids[owner] = bid
        self._owners[bid] = owner

    def assign(self, wanted: Iterable[Owner]) -> dict[Owner, int]:
        """Give every wanted owner an id, keep the ids of those that have one, and let the
        others go. Returns the ids let go; they join `held`."""
        wanted = list(wanted)
        keep = set(wanted)
        released = {o: i for o, i in self._ids.items() if o not in keep}
        for owner, bid in released.items():
            del self._ids[owner], self._owners[bid]
        self.held |= set(released.values())
        candidate = 1
        for owner in wanted:
            if owner in self._ids:
                continue
            while candidate in self._owners or candidate in self.held:
                candidate += 1
            self._ids[owner] = candidate
            self._owners[candidate] = owner
            candidate += 1
        return released
