"""Tiny TCP server and client that lab scenarios run inside the host namespaces.

Standard library only and run as a plain file, so it works under any python3 on the
host. Each prints one JSON object per line on stdout: the server its events, the client
what it saw (error name, errno, elapsed time, addresses).
"""

import argparse
import errno
import json
import select
import socket
import struct
import sys
import threading
import time


def emit(record):
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def serve(port, mode):
    """Accept forever; ``echo`` answers each request, ``abort`` resets after reading it,
    ``close`` answers and closes at once, before the client's FIN (as HTTP/1.0 servers do)."""
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
            if mode == "echo":  # wait for the client's end before closing
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
        except OSError as exc:
            emit({"event": "error", "error": errno.errorcode.get(exc.errno, str(exc))})
        finally:
            conn.close()
        emit({"event": "closed", "peer": list(peer), "mode": mode})


def connect(address, port, timeout, payload, bind, out_of_window=False, close_delay_ms=0.0):
    """One request; report the outcome as the application sees it. ``close_delay_ms``:
    wait that long after the server's end of stream before closing."""
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
        if out_of_window:
            send_out_of_window(sock)
            time.sleep(0.2)  # the stray segment dies on the way before the request follows
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
    if close_delay_ms and error is None:
        time.sleep(close_delay_ms / 1000.0)  # after the delayed ACK: the FIN goes on its own
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


#: bytes added to each ``delay`` answer, so responses are bigger than requests
RESPONSE_PAD = 400
_EMIT = threading.Lock()


def emit_shared(record):
    """``emit`` from several threads: one whole line at a time."""
    with _EMIT:
        emit(record)


def serve_exchanges(port, delay_ms):
    """Request/response on long connections: each request line is answered after
    ``delay_ms`` (an application that is slow, where the network is not); one thread per
    connection so several clients are served at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    emit_shared({"event": "listening", "port": port, "delay_ms": delay_ms})
    while True:
        conn, peer = listener.accept()
        emit_shared({"event": "accepted", "peer": list(peer), "local": list(conn.getsockname())})
        threading.Thread(target=_answer, args=(conn, peer, delay_ms), daemon=True).start()


def _answer(conn, peer, delay_ms):
    answered = 0
    reader = conn.makefile("rb")
    try:
        for request in reader:
            time.sleep(delay_ms / 1000.0)
            conn.sendall(b"ok " + request.rstrip(b"\n") + b" " + b"x" * RESPONSE_PAD + b"\n")
            answered += 1
    except OSError as exc:
        emit_shared({"event": "error", "error": errno.errorcode.get(exc.errno, str(exc))})
    finally:
        reader.close()
        conn.close()
    emit_shared({"event": "closed", "peer": list(peer), "mode": "delay", "answered": answered})


def exchange(address, port, timeout, bind, connections, exchanges):
    """``connections`` connections at once, ``exchanges`` request/response rounds on each;
    report every round's time as the client measured it (send to whole response)."""
    results = [None] * connections
    threads = [
        threading.Thread(target=_rounds, args=(results, i, address, port, timeout, bind, exchanges))
        for i in range(connections)
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r["error"] for r in results if r["error"]]
    emit_shared(
        {
            "error": errors[0] if errors else None,
            "errno": next((r["errno"] for r in results if r["error"]), None),
            "phase": next((r["phase"] for r in results if r["error"]), "done"),
            "elapsed_ms": round((time.monotonic() - start) * 1000.0, 3),
            "client_address": results[0]["client_address"],
            "client_port": results[0]["client_port"],
            "address": address,
            "port": port,
            "received": results[0]["received"],
            "connections": results,
        }
    )


def _rounds(results, index, address, port, timeout, bind, exchanges):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((bind, 0))
    local = sock.getsockname()
    phase, error, err_no, rtt_ms, received = "connect", None, None, [], b""
    try:
        sock.connect((address, port))
        reader = sock.makefile("rb")
        for n in range(exchanges):
            phase = "send"
            start = time.monotonic()
            sock.sendall(b"request %d %d\n" % (index, n))
            phase = "recv"
            received = reader.readline()
            if not received.endswith(b"\n"):
                raise OSError(errno.ECONNRESET, "connection closed before the response")
            rtt_ms.append(round((time.monotonic() - start) * 1000.0, 3))
        reader.close()
    except TimeoutError:
        error, err_no = "ETIMEDOUT", errno.ETIMEDOUT
    except OSError as exc:
        err_no = exc.errno
        error = errno.errorcode.get(exc.errno, str(exc))
    sock.close()
    results[index] = {
        "client_address": local[0],
        "client_port": local[1],
        "error": error,
        "errno": err_no,
        "phase": phase if error else "done",
        "exchanges": len(rtt_ms),
        "rtt_ms": rtt_ms,
        "received": received.decode("utf-8", "replace"),
    }


# -- drop scenarios: a listener that never accepts, many connects, an out-of-window segment --

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21  # linux/tcp.h
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_OFF_NO_WP = -1  # leave repair mode without the window probe (an extra old segment)


def serve_no_accept(port, backlog):
    """Listen and never accept: once the accept queue is full, the kernel refuses SYNs."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(backlog)
    emit({"event": "listening", "port": port, "backlog": backlog})
    while True:
        time.sleep(3600)


def connect_many(address, port, timeout, bind, count):
    """``count`` connects at once, held open until all are done; one summary line.

    The outcome is the first failure (as ``connect`` reports it), with how many connected."""
    socks = []
    start = time.monotonic()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((bind, 0))
        sock.connect_ex((address, port))
        socks.append(sock)
    pending = dict((s.fileno(), s) for s in socks)
    outcome = {}
    while pending and time.monotonic() - start < timeout:
        _, ready, _ = select.select([], list(pending.values()), [], 0.05)
        for sock in ready:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            outcome[sock.fileno()] = errno.errorcode.get(err) if err else None
            del pending[sock.fileno()]
    for fd in pending:
        outcome[fd] = "ETIMEDOUT"
    failed = [s for s in socks if outcome[s.fileno()]]
    first = failed[0] if failed else socks[0]
    error = outcome[first.fileno()]
    local = first.getsockname()
    emit(
        {
            "error": error,
            "errno": getattr(errno, error) if error else None,
            "phase": "connect" if error else "done",
            "elapsed_ms": round((time.monotonic() - start) * 1000.0, 3),
            "client_address": local[0],
            "client_port": local[1],
            "address": address,
            "port": port,
            "received": "",
            "connected": count - len(failed),
            "failed": len(failed),
        }
    )
    for sock in socks:
        sock.close()


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_out_of_window(sock, offset=0x40000000):
    """Send, beside the kernel, one segment of this connection whose sequence number lies
    ``offset`` bytes past what the socket sends next: conntrack on the way finds it out of
    window. The socket's own sequence numbers are read in repair mode."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        snd = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    (src, sport), (dst, dport) = sock.getsockname(), sock.getpeername()
    payload = b"x"
    seq = (snd + offset) & 0xFFFFFFFF
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, rcv, 5 << 4, 0x18, 502, 0, 0) + payload
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        raw.sendto(ip + tcp, (dst, 0))
    finally:
        raw.close()
    return seq


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role")
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    modes = ("echo", "abort", "close", "delay", "no-accept")
    server.add_argument("--mode", choices=modes, default="echo")
    server.add_argument("--delay-ms", type=float, default=0.0, help="delay mode: per answer")
    server.add_argument("--backlog", type=int, default=1, help="no-accept mode: listen backlog")
    client = sub.add_parser("client")
    client.add_argument("--address", required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--timeout", type=float, default=3.0)
    client.add_argument("--payload", default="hello\n")
    client.add_argument("--bind", default="0.0.0.0")
    client.add_argument(
        "--connections",
        type=int,
        default=0,
        help="request/response rounds on this many connections at once",
    )
    client.add_argument("--exchanges", type=int, default=1, help="rounds per connection")
    client.add_argument("--many", type=int, default=1, help="connects at once, held open")
    client.add_argument("--out-of-window", action="store_true")
    client.add_argument("--close-delay-ms", type=float, default=0.0,
                        help="wait after the response before closing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.role == "server" and args.mode == "delay":
        serve_exchanges(args.port, args.delay_ms)
    elif args.role == "server" and args.mode == "no-accept":
        serve_no_accept(args.port, args.backlog)
    elif args.role == "server":
        serve(args.port, args.mode)
    elif args.role == "client" and args.connections:
        exchange(args.address, args.port, args.timeout, args.bind, args.connections, args.exchanges)
    elif args.role == "client" and args.many > 1:
        connect_many(args.address, args.port, args.timeout, args.bind, args.many)
    elif args.role == "client":
        connect(args.address, args.port, args.timeout, args.payload.encode(), args.bind,
                args.out_of_window, args.close_delay_ms)  # fmt: skip
    else:
        parser.error("choose server or client")
    return 0


if __name__ == "__main__":
    sys.exit(main())
