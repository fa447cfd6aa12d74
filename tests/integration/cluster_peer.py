"""A gateway process stand-in for tests/integration/test_cluster_flights.py: leads one flight.

    python -m tests.integration.cluster_peer REDIS_URL KEY EVENTS DELAY [wait-follower] [gevent]

Prints LEADING once it leads (ALONE if Redis said "go alone"), optionally waits up to 5 s for
a follower, streams EVENTS SSE events DELAY seconds apart and ``[DONE]``, prints FINISHED.
``gevent``: monkey-patched, the keeper a greenlet, as in a gateway's worker.
"""

from __future__ import annotations

import sys
import threading
import time

from ntonix.cluster.flights import Flights, Leader


def main(argv: list[str]) -> int:
    url, key, n, delay = argv[0], argv[1], int(argv[2]), float(argv[3])
    if "gevent" in argv[4:]:
        import gevent

        flights = Flights(url, backoff_s=0.2, spawn=gevent.spawn, sleep=gevent.sleep)
    else:
        flights = Flights(url, backoff_s=0.2, spawn=lambda fn: threading.Thread(target=fn, daemon=True).start())
    role = flights.join(key)
    if not isinstance(role, Leader):
        print("FOLLOWER", flush=True)
        return 1
    print("LEADING" if role.value is not None else "ALONE", flush=True)
    if "wait-follower" in argv[4:]:
        deadline = time.monotonic() + 5
        while not role.followers_seen and time.monotonic() < deadline:
            time.sleep(0.01)
    role.publish_head(200, (("Content-Type", "text/event-stream"),))
    for i in range(n):
        time.sleep(delay)
        role.publish_chunk(f"data: {{\"n\": {i}}}\n\n".encode())
    role.publish_chunk(b"data: [DONE]\n\n")
    role.finish(True)
    print("FINISHED", flush=True)
    flights.close()
    return 0


if __name__ == "__main__":
    if "gevent" in sys.argv[5:]:
        from gevent import monkey

        monkey.patch_all()
    sys.exit(main(sys.argv[1:]))
