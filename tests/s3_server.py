"""Test plumbing for object storage, loopback only: moto's S3 server on 127.0.0.1 (a free port),
and a small TCP proxy that drops, delays or answers 503 to chosen connections, counts the bytes it
carries and stops itself after a bounded time."""
import contextlib
import os
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
    """Forwards 127.0.0.1:port to `target`; connection number i (0-based) gets `faults.get(i)`:
    'drop' (closed once the request arrives; the next connection too, as aiohttp resends once by
    itself), 'delay' (the reply held back `delay` s), '503' (Service Unavailable), '403' (Access
    Denied), or nothing. At most `max_faults` faults, and it stops itself after
    `lifetime` seconds."""

    def __init__(self, target: str, every: int = 0, kinds=("drop",), max_faults: int = 10, delay: float = 3.0,
                 lifetime: float = 120.0, first: int = 0):
        host, port = target.rsplit("//", 1)[-1].split(":")
        assert host in (HOST, "localhost"), f"the proxy forwards to loopback only, not {host}"
        self.target = (HOST, int(port))
        self.every, self.kinds, self.max_faults, self.delay, self.lifetime, self.first = every, kinds, max_faults, delay, lifetime, first
        self.connections, self.faults, self.up_bytes, self.down_bytes, self._resend_drop = 0, [], 0, 0, False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.endpoint = f"http://{HOST}:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _fault_for(self, i: int) -> str | None:
        if self._resend_drop:                           # aiohttp resends once on a fresh connection (RFC 9112):
            self._resend_drop = False                   # drop that too, so the fault reaches the client
            return "drop"
        if not self.every or len(self.faults) >= self.max_faults or i < self.first or (i - self.first) % self.every: return None
        kind = self.kinds[len(self.faults) % len(self.kinds)]
        self.faults.append(kind)
        self._resend_drop = kind == "drop"
        return kind

    def _serve(self):
        while not self._stop.is_set() and time.monotonic() - self._t0 < self.lifetime:
            try: client, _ = self._sock.accept()
            except socket.timeout: continue
            with self._lock:
                i = self.connections
                self.connections += 1
                fault = self._fault_for(i)
            threading.Thread(target=self._handle, args=(client, fault), daemon=True).start()
        self._sock.close()

    def _handle(self, client: socket.socket, fault: str | None):
        client.settimeout(30)
        try:
            if fault in ("drop", "503", "403"):
                request = client.recv(65536)            # the request arrives...
                if fault in ("503", "403"):
                    status, code = (b"503 Service Unavailable", b"ServiceUnavailable") if fault == "503" else (b"403 Forbidden", b"AccessDenied")
                    body = b"<Error><Code>%s</Code><Message>refused by the test proxy</Message></Error>" % code
                    if request.startswith(b"HEAD "): body = b""   # a reply to HEAD has no body
                    client.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/xml\r\n"
                                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
                client.shutdown(socket.SHUT_RDWR)       # ...and the connection goes away
                return
            server = socket.create_connection(self.target, timeout=30)
            if fault == "delay": time.sleep(self.delay)
            pumps = [threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True),
                     threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True)]
            for p in pumps: p.start()
            for p in pumps: p.join(60)
            server.close()
        except OSError: pass                            # the client gave up on this connection (its retry is counted there)
        finally: client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str):
        try:
            while True:
                data = src.recv(65536)
                if not data: break
                with self._lock:                        # counted before it is passed on: a reader sees it counted
                    if way == "up": self.up_bytes += len(data)
                    else: self.down_bytes += len(data)
                dst.sendall(data)
        except OSError: pass                            # either side closed: this connection is over
        finally:
            with contextlib.suppress(OSError): dst.shutdown(socket.SHUT_WR)

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def __enter__(self): return self
    def __exit__(self, *exc): self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]
