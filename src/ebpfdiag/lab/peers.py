"""Tiny TCP server and client that lab scenarios run inside the host namespaces.

Standard library only and run as a plain file, so it works under any python3 on the
host. Each prints one JSON object per line on stdout: the server its events, the client
what it saw (error name, errno, elapsed time, addresses).
"""

import argparse
import errno
import json
import socket
import struct
import sys
import time


def emit(record):
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def serve(port, mode):
    """Accept forever; ``echo`` answers each request, ``abort`` resets after reading it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    emit({"event": "listening", "port": port})
    while True:
        conn, peer = listener.accept()
        local = conn.getsockname()
        emit({"event": "accepted", "peer": list(peer), "local": list(local)})
        conn.settimeout(5)
        try:
            request = conn.recv(4096)
            if mode == "abort":
                # Linger with a zero timeout: close() sends RST instead of FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.sendall(b"ok " + request)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
        except OSError as exc:
            emit({"event": "error", "error": errno.errorcode.get(exc.errno, str(exc))})
        finally:
            conn.close()
        emit({"event": "closed", "peer": list(peer), "mode": mode})


def connect(address, port, timeout, payload, bind):
    """One request; report the outcome as the application sees it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((bind, 0))  # a known source address and port even when connect() fails
    local = sock.getsockname()
    received = b""
    phase = "connect"
    error = None
    err_no = None
    start = time.monotonic()
    try:
        sock.connect((address, port))
        local = sock.getsockname()
        phase = "send"
        sock.sendall(payload)
        phase = "recv"
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        error, err_no = "ETIMEDOUT", errno.ETIMEDOUT
    except OSError as exc:
        err_no = exc.errno
        error = errno.errorcode.get(exc.errno, str(exc))
    elapsed_ms = (time.monotonic() - start) * 1000.0
    sock.close()
    emit(
        {
            "error": error,
            "errno": err_no,
            "phase": phase if error else "done",
            "elapsed_ms": round(elapsed_ms, 3),
            "client_address": local[0],
            "client_port": local[1],
            "address": address,
            "port": port,
            "received": received.decode("utf-8", "replace"),
        }
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role")
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--mode", choices=("echo", "abort"), default="echo")
    client = sub.add_parser("client")
    client.add_argument("--address", required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--timeout", type=float, default=3.0)
    client.add_argument("--payload", default="hello\n")
    client.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args(argv)
    if args.role == "server":
        serve(args.port, args.mode)
    elif args.role == "client":
        connect(args.address, args.port, args.timeout, args.payload.encode(), args.bind)
    else:
        parser.error("choose server or client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
