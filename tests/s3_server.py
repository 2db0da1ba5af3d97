"""Test plumbing for object storage, loopback only: moto's S3 server on 127.0.0.1 (a free port),
and a small TCP proxy that drops, delays or answers 503 to chosen connections, counts the bytes it
carries and stops itself after a bounded time."""
import contextlib
import os
import re
import socket
import threading
import time

HOST = "127.0.0.1"   # nothing here ever listens on, or connects to, another address
CREDS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")


@contextlib.contextmanager
def moto_s3():
    "A moto S3 server on 127.0.0.1 at a free port; yields its endpoint URL."
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # no line per request
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == HOST, host
    try: yield f"http://{HOST}:{port}"
    finally: server.stop()


def s3_options(endpoint: str, **extra) -> dict:
    "s3fs storage options for the loopback server (fake credentials)."
    return dict(endpoint_url=endpoint, key=CREDS["AWS_ACCESS_KEY_ID"], secret=CREDS["AWS_SECRET_ACCESS_KEY"],
                client_kwargs=dict(region_name=CREDS["AWS_DEFAULT_REGION"]), **extra)


def make_bucket(endpoint: str, bucket: str, files: dict[str, bytes | str]):
    "Create `bucket` on the server and upload `{key: bytes or local path}`."
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for key, data in files.items():
        body = data if isinstance(data, bytes) else open(data, "rb").read()
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return s3


class FaultProxy:
    """Forwards 127.0.0.1:port to `target`; request number i (0-based, in order of arrival, one request a
    connection) gets `faults.get(i)`: 'drop' (the connection closed once the request arrives; the
    client's own resend of that request too), 'delay' (the reply held back `delay` s), '503' (Service
    Unavailable), '403' (Access Denied), or nothing; with `drop_resends=False` the resend of a dropped
    request goes through. At most `max_faults` faults, and it stops itself after `lifetime` seconds. `log` holds one entry per connection: its number, its fault and the
    request lines it carried (`report()` prints them)."""

    def __init__(self, target: str, every: int = 0, kinds=("drop",), max_faults: int = 10, delay: float = 3.0,
                 lifetime: float = 120.0, first: int = 0, drop_resends: bool = True):
        host, port = target.rsplit("//", 1)[-1].split(":")
        assert host in (HOST, "localhost"), f"the proxy forwards to loopback only, not {host}"
        self.target = (HOST, int(port))
        self.every, self.kinds, self.max_faults, self.delay, self.lifetime, self.first = every, kinds, max_faults, delay, lifetime, first
        self.drop_resends = drop_resends
        self.connections, self.requests, self.faults, self.up_bytes, self.down_bytes = 0, 0, [], 0, 0
        self.log: list[dict] = []
        self._dropped: set[bytes] = set()               # the calls whose request was dropped, until their resend arrives
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.endpoint = f"http://{HOST}:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    @staticmethod
    def _call_id(head: bytes) -> bytes:
        "What identifies one call of the client: botocore's invocation id (the same in the client's resend), else the whole head."
        m = re.search(rb"^amz-sdk-invocation-id: *(\S+)", head, re.M | re.I)
        return m.group(1) if m else head

    def _fault_for(self, head: bytes) -> str | None:
        call = self._call_id(head)
        if call in self._dropped:                       # aiohttp resends a request once, by itself, when its connection
            self._dropped.discard(call)                 # closes before the reply (RFC 9112): drop that resend too, so the
            return "drop" if self.drop_resends else None   # fault reaches the client; other clients' requests pass as planned
        i = self.requests
        self.requests += 1
        if not self.every or len(self.faults) >= self.max_faults or i < self.first or (i - self.first) % self.every: return None
        kind = self.kinds[len(self.faults) % len(self.kinds)]
        self.faults.append(kind)
        if kind == "drop": self._dropped.add(call)
        return kind

    def _serve(self):
        while not self._stop.is_set() and time.monotonic() - self._t0 < self.lifetime:
            try: client, _ = self._sock.accept()
            except socket.timeout: continue
            with self._lock:
                entry = dict(conn=self.connections, fault=None, t=round(time.monotonic() - self._t0, 3), requests=[])
                self.connections += 1
                self.log.append(entry)
            threading.Thread(target=self._handle, args=(client, entry), daemon=True).start()
        self._sock.close()

    @staticmethod
    def _read_head(client: socket.socket) -> bytes:
        "The first request's line and headers (the requests here have no body), or what came before the client closed."
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = client.recv(65536)
            if not data: break
            head += data
        return head

    def _handle(self, client: socket.socket, entry: dict):
        client.settimeout(30)
        try:
            head = self._read_head(client)              # the request arrives...
            if not head: return                         # (a connection closed unused)
            with self._lock:
                resend = self._call_id(head) in self._dropped
                fault = self._fault_for(head)
                entry["fault"] = ("drop*" if fault else "resent") if resend else fault   # the client's resend of a dropped request
                self.up_bytes += len(head)
            self._note(entry, head)
            if fault in ("drop", "503", "403"):
                if fault in ("503", "403"):
                    status, code = (b"503 Service Unavailable", b"ServiceUnavailable") if fault == "503" else (b"403 Forbidden", b"AccessDenied")
                    body = b"<Error><Code>%s</Code><Message>refused by the test proxy</Message></Error>" % code
                    if head.startswith(b"HEAD "): body = b""   # a reply to HEAD has no body
                    client.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\n"
                                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
                client.shutdown(socket.SHUT_RDWR)       # ...and the connection goes away
                return
            server = socket.create_connection(self.target, timeout=30)
            if fault == "delay": time.sleep(self.delay)
            server.sendall(head)
            pumps = [threading.Thread(target=self._pump, args=(client, server, "up", entry), daemon=True),
                     threading.Thread(target=self._pump, args=(server, client, "down", entry), daemon=True)]
            for p in pumps: p.start()
            for p in pumps: p.join(60)
            server.close()
        except OSError: pass                            # the client gave up on this connection (its retry is counted there)
        finally: client.close()

    _REQUEST = re.compile(rb"^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/", re.M)

    def _note(self, entry: dict, data: bytes):
        "Record the request lines (method and path) in `data` under this connection."
        with self._lock: entry["requests"] += [f"{m.decode()} {p.decode()}" for m, p in self._REQUEST.findall(data)]

    def _pump(self, src: socket.socket, dst: socket.socket, way: str, entry: dict):
        try:
            while True:
                data = src.recv(65536)
                if not data: break
                if way == "up": self._note(entry, data)
                with self._lock:                        # counted before it is passed on: a reader sees it counted
                    if way == "up": self.up_bytes += len(data)
                    else: self.down_bytes += len(data)
                dst.sendall(data)
        except OSError: pass                            # either side closed: this connection is over
        finally:
            with contextlib.suppress(OSError): dst.shutdown(socket.SHUT_WR)

    def report(self) -> str:
        "One line per connection: number, fault, start time and the requests it carried."
        with self._lock:
            return "\n".join(f"#{e['conn']:3d} {e['fault'] or '-':6s} t={e['t']:7.3f} {' | '.join(e['requests']) or '(no request)'}"
                             for e in self.log)

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]
