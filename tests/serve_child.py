"""Kill-test child for ``fastfc serve``: the server of the ``serve`` command
(:class:`fastfc.tools.cli.serve.Server`) over units ``A`` and ``B``, with
the Global Mirror session ``S`` forming CGs on a thread, until the parent
kills it with SIGKILL. ``on_coordinate`` records the A images of every
coordination instant in ``SNAPS/N.npy`` (atomic rename), so the parent
can check the C volumes after reopening.

    python tests/serve_child.py A B SOCKET SNAPS

(The control socket, once merged, lets a plain ``fastfc serve`` and
``fastfc formcg --seconds`` do this.)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from fastfc.tools.cli.serve import Server
from fastfc.tools.cli.units import Units


def main() -> None:
    a, b, sock, snaps = sys.argv[1:5]
    snaps_dir = Path(snaps)
    snaps_dir.mkdir(exist_ok=True)
    units = Units(a, b)
    server = Server(units)
    with server.lock:
        gm = units.session("S")
    a_vols = [t.a for t in gm.triplets]

    def record(sequence: int) -> None:     # A's writes are held here
        images = np.stack([v.read(0, v.capacity) for v in a_vols])
        tmp = snaps_dir / f".{sequence}.npy"
        np.save(tmp, images)
        os.replace(tmp, snaps_dir / f"{sequence}.npy")

    gm.on_coordinate = record
    server.nbd.listen_unix(sock)
    server.nbd.start()

    def form() -> None:
        while True:
            gm.form_consistency_group()
            time.sleep(0.005)

    threading.Thread(target=form, daemon=True).start()
    print("READY", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
