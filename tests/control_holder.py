"""A stand-in for ``fastfc serve`` in the control-socket tests: holds a unit
(and its partners) open, carries out forwarded commands through
``hosting(...)`` until SIGTERM or SIGINT, then closes the units.

    python control_holder.py UNIT [REMOTE]

Prints ``ready`` on stdout once the control sockets exist. Swap it for
``fastfc -u UNIT serve --socket PATH`` once that exists: the tests only
start it, wait for ``ready`` (or the socket) and signal it.
"""

from __future__ import annotations

import signal
import sys
import threading

from fastfc.tools.cli.control import hosting
from fastfc.tools.cli.units import Units


def main(unit: str, remote: str | None = None) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    units = Units(unit, remote)
    lock = threading.RLock()
    try:
        units.local()
        with hosting(units, lock):
            print("ready", flush=True)
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        with lock:
            units.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
