"""A stand-in for a ``fastfc`` client whose forwarding path imports nothing
but the standard library: it sends ``fastfc ARGS`` to the server holding
the unit named by ``-u`` through ``UNIT/control.sock`` (the wire format of
``fastfc.tools.cli.control``: one ``q`` frame, the request; ``o``/``e``
frames of output back, then ``x``, the exit status) and exits with that
status. The ``serve_gm`` suite times it beside the real client: the floor a
forwarding client can reach (Python's start and a round trip), against what
the real one spends importing the engine before it forwards.

    python benches/serve_lean_client.py -u UNIT COMMAND [ARGS...]

Not the product: no checks of the socket's owner, no fallback when no
server holds the unit (exit status 3).
"""

import json
import os
import socket
import struct
import sys

HEADER = struct.Struct(">cI")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        got = sock.recv(min(n, 1 << 20))
        if not got:
            raise SystemExit("the server closed the connection")
        parts.append(got)
        n -= len(got)
    return b"".join(parts)


def main() -> int:
    argv = sys.argv[1:]
    unit = argv[argv.index("-u") + 1]
    stream = {"encoding": "utf-8", "errors": "strict", "tty": False}
    request = {"argv": argv, "prog_name": "fastfc", "cwd": os.getcwd(),
               "env": {k: v for k, v in os.environ.items() if k.startswith("FASTFC_")},
               "stdout": stream, "stderr": stream}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(unit, "control.sock"))
    except OSError:
        return 3
    body = json.dumps(request).encode()
    sock.sendall(HEADER.pack(b"q", len(body)) + body)
    while True:
        kind, n = HEADER.unpack(recv_exact(sock, HEADER.size))
        data = recv_exact(sock, n)
        if kind == b"o":
            sys.stdout.buffer.write(data)
        elif kind == b"e":
            sys.stderr.buffer.write(data)
        elif kind == b"x":
            sys.stdout.flush()
            return int(json.loads(data)["status"])


if __name__ == "__main__":
    sys.exit(main())
