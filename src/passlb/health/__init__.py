"""Health checking: is each backend fit to take new flows?

- ``policy``: the pure rise/fall state machine per backend (rules table inside).
- ``target``: pure; which check, address and port apply to a backend.
- ``http``: a minimal HTTP/1.1 client over asyncio streams.
- ``probes``: ``probe()``, one coroutine per check type, bounded and never raising.
- ``scheduler``: ``HealthChecker``, one task per backend feeding the policy.
- ``testing``: ``VirtualClock`` to drive the checker in virtual time.

Nothing is re-exported here, so importing the pure modules pulls in no asyncio.
"""
