"""A local OpenAI-compatible embeddings server for tests: meaningful fake vectors, injected faults, a log.

Built on `http.server` with HTTP/1.1 keep-alive and Nagle off (without both, every answer costs about
40 ms of delayed ACK and a benchmark through it measures that). Vectors come from `vector_for`: each
word is a seeded pseudo-random unit vector and a text is their normalised sum, so texts that share
words are close and texts that share none are not.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import random
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Literal, Self

import pytest

from vectorstore.chunks import openai_tokens

__all__ = [
    "DEFAULT_DIMENSIONS",
    "DISCONNECT",
    "MALFORMED",
    "MAX_INPUTS",
    "TIMEOUT",
    "TRUNCATED",
    "EmbeddingServer",
    "EmbeddingServerFactory",
    "FaultKind",
    "RecordedRequest",
    "embedding_server",
    "embedding_server_factory",
    "mask_key",
    "tokens",
    "vector_for",
]

DEFAULT_DIMENSIONS: Final = 64
#: The most inputs one request may carry, as OpenAI.
MAX_INPUTS: Final = 2048
#: A fault: the server reads the request and never answers; it holds the connection until the client
#: hangs up (its timeout), the server stops, or `hold_s` passes.
TIMEOUT: Final = "timeout"
#: A fault: the server closes the connection without answering.
DISCONNECT: Final = "disconnect"
#: A fault: 200 with an HTML page instead of JSON (a proxy or a wrong base URL).
MALFORMED: Final = "malformed"
#: A fault: 200 with valid JSON that holds one vector fewer than there were inputs.
TRUNCATED: Final = "truncated"

#: An HTTP status to answer with (429, 500, 503, 400, 401, 403, 404...), or one of the named faults.
FaultKind = int | Literal["timeout", "disconnect", "malformed", "truncated"]
Action = Literal["send", "hold", "drop"]

_WORD = re.compile(r"\w+")
_KEY_HELP = "You can find your API key at https://platform.openai.com/account/api-keys."
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_INPUT = (
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
)
_TOO_LONG = (
    "This model's maximum context length is {limit} tokens, however you requested {used} tokens "
    "({used} in your prompt; 0 for the completion). Please reduce your prompt; or completion length."
)
_DEFAULT_MESSAGES: Final = {
    400: ("Bad request (injected).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("Project does not have access to this model.", "invalid_request_error", "model_not_found"),
    404: ("The model does not exist or you do not have access to it.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


# --- vectors -------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """The lower-cased word tokens of a text; a text without any word is one token of itself."""
    return _WORD.findall(text.lower()) or [text]


def vector_for(text: str, dims: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The unit vector the server answers for a text: the normalised sum of its tokens' vectors."""
    return list(_vector(text, dims))


@lru_cache(maxsize=4_096)  # at 1,536 dimensions, about 200 MB when full
def _vector(text: str, dims: int) -> tuple[float, ...]:
    # Cached: a benchmark warms it, so that the server's own arithmetic is not what it measures.
    total = [0.0] * dims
    for token in tokens(text):
        for i, value in enumerate(_token_vector(token, dims)):
            total[i] += value
    return _normalised(total)


@lru_cache(maxsize=65_536)
def _token_vector(token: str, dims: int) -> tuple[float, ...]:
    # hashlib, not hash(): the same token gives the same vector in every process.
    seed = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return _normalised([rng.gauss(0.0, 1.0) for _ in range(dims)])


def _normalised(values: Sequence[float]) -> tuple[float, ...]:
    norm = math.sqrt(sum(value * value for value in values))
    return tuple(value / norm for value in values) if norm else tuple(values)


def mask_key(key: str) -> str:
    """The masked form of a key that the server echoes in a 401, as OpenAI does: `sk-ab***yz`."""
    return f"{key[:5]}***{key[-2:]}" if len(key) > 8 else "***"


# --- requests, answers, faults -------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, and what it answered."""

    arrived_s: float  # time.monotonic() when the request line was read
    method: str
    path: str
    model: str | None
    inputs: int
    dimensions: int | None  # None when the request did not send `dimensions`
    encoding_format: str | None
    status: int | None  # None when nothing was answered (a timeout or a dropped connection)
    client_port: int  # the same port for two requests means one kept-alive connection


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    retry_after_s: float | None = None
    retry_after_ms: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class _Request:
    arrived_s: float
    method: str
    path: str
    authorization: str | None
    body: bytes
    client_port: int


@dataclass(frozen=True)
class _Payload:
    """The fields of a request body, read leniently so that even a bad request can be logged."""

    is_object: bool
    model: object = None
    input: object = None
    dimensions: object = None
    encoding_format: object = None

    @classmethod
    def parse(cls, body: bytes) -> _Payload:
        try:
            data = json.loads(body)
        except ValueError:
            return cls(is_object=False)
        if not isinstance(data, dict):
            return cls(is_object=False)
        fields = ("model", "input", "dimensions", "encoding_format")
        return cls(is_object=True, **{name: data.get(name) for name in fields})

    @property
    def texts(self) -> list[str] | None:
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input, list) and all(isinstance(text, str) for text in self.input):
            return list(self.input)
        return None

    @property
    def input_count(self) -> int:
        if isinstance(self.input, list):
            return len(self.input)
        return 0 if self.input is None else 1


@dataclass(frozen=True)
class _Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    action: Action = "send"

    @property
    def logged_status(self) -> int | None:
        return self.status if self.action == "send" else None


def _error(
    status: int, message: str, kind: str, code: str | None = None, headers: tuple[tuple[str, str], ...] = ()
) -> _Answer:
    error = {"message": message, "type": kind, "param": None, "code": code}
    return _Answer(status=status, body=json.dumps({"error": error}).encode(), headers=headers)


def _invalid(message: str) -> _Answer:
    return _error(400, message, "invalid_request_error")


def _retry_headers(fault: _Fault) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    if fault.retry_after_s is not None:
        seconds = float(fault.retry_after_s)
        headers.append(("Retry-After", str(int(seconds)) if seconds.is_integer() else str(seconds)))
    if fault.retry_after_ms is not None:
        headers.append(("retry-after-ms", str(fault.retry_after_ms)))
    return tuple(headers)


def _status_fault(fault: _Fault, status: int) -> _Answer:
    default, kind, code = _DEFAULT_MESSAGES.get(
        status,
        (f"Injected failure {status}.", "server_error" if status >= 500 else "invalid_request_error", None),
    )
    return _error(status, fault.message or default, kind, code, _retry_headers(fault))


_SPECIAL_FAULTS: Final[dict[str, _Answer]] = {
    TIMEOUT: _Answer(action="hold"),
    DISCONNECT: _Answer(action="drop"),
    MALFORMED: _Answer(body=b"<html><body>Welcome to nginx!</body></html>", content_type="text/html"),
}


# --- validation and the embeddings answer --------------------------------------------------------


def _input_problem(payload: _Payload) -> str | None:
    texts = payload.texts
    if texts is None or not texts or "" in texts:
        return _BAD_INPUT
    if len(texts) > MAX_INPUTS:
        return f"Too many inputs: {len(texts)}. The maximum is {MAX_INPUTS} inputs per request."
    return None


def _option_problem(payload: _Payload) -> str | None:
    dims = payload.dimensions
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        return f"Invalid value for 'dimensions': {dims!r}. It must be a positive integer."
    if dims is not None and str(payload.model).startswith("text-embedding-ada"):
        return "This model does not support specifying dimensions."
    if payload.encoding_format not in (None, "float", "base64"):
        return f"Invalid value for 'encoding_format': {payload.encoding_format!r}. Use 'float' or 'base64'."
    return None


def _length_problem(payload: _Payload, limit: int | None) -> str | None:
    """OpenAI's refusal of the first input past `limit` tokens of cl100k_base, if any."""
    if limit is None:
        return None
    for text in payload.texts or []:
        # A token is at least one byte: only a text of more bytes than the limit needs counting.
        if len(text.encode(errors="surrogatepass")) > limit and (used := _token_count(text)) > limit:
            return _TOO_LONG.format(limit=limit, used=used)
    return None


def _token_count(text: str) -> int:
    return len(openai_tokens().offsets(text))


def _payload_problem(payload: _Payload) -> str | None:
    if not payload.is_object:
        return "We could not parse the JSON body of your request."
    if not isinstance(payload.model, str) or not payload.model:
        return "You must provide a model parameter."
    return _input_problem(payload) or _option_problem(payload)


def _encoded(vector: list[float], encoding_format: object) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _embeddings(payload: _Payload, dims: int, *, reverse: bool, drop_last: bool) -> _Answer:
    texts = payload.texts or []
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _encoded(vector_for(text, dims), payload.encoding_format),
        }
        for i, text in enumerate(texts)
    ]
    data = data[:-1] if drop_last else data
    data = data[::-1] if reverse else data
    used = sum(len(tokens(text)) for text in texts)
    usage = {"prompt_tokens": used, "total_tokens": used}
    body = {"object": "list", "data": data, "model": payload.model, "usage": usage}
    return _Answer(body=json.dumps(body).encode())


def _bearer(authorization: str | None) -> str | None:
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    return authorization.removeprefix("Bearer ").strip() or None


# --- the server ----------------------------------------------------------------------------------


@dataclass
class _Controls:
    """Everything a test can change while the server runs; guarded by the server's lock."""

    latency_ms: int = 0
    reverse_data: bool = False
    queued: deque[_Fault] = field(default_factory=deque)
    fault_rate: float = 0.0
    fault_kinds: tuple[FaultKind, ...] = ()
    fault_retry_after_s: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    log: list[RecordedRequest] = field(default_factory=list)


class EmbeddingServer:
    """An OpenAI-compatible `POST /v1/embeddings` on 127.0.0.1, on a free port, in a daemon thread.

    With `api_key`, requests without `Authorization: Bearer <api_key>` get a 401 that echoes the masked
    key they sent. Faults, latency and answer order can be changed while it runs, from any thread.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        dimensions: int = DEFAULT_DIMENSIONS,
        latency_ms: int = 0,
        hold_s: float = 30.0,
        max_input_tokens: int | None = 8192,
    ) -> None:
        self.api_key = api_key
        #: The most tokens (cl100k_base) one input may have, as OpenAI's embedding models; None: no limit.
        self.max_input_tokens = max_input_tokens
        self.default_dimensions = dimensions
        #: The longest a TIMEOUT fault holds a connection that the client keeps open.
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._initial_latency_ms = latency_ms
        self._controls = _Controls(latency_ms=latency_ms)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("the embedding server is already started")
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="embedding-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the embedding server is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The URL to give `openai.OpenAI(base_url=...)`: `http://127.0.0.1:PORT/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    # controls

    def fail_next(
        self,
        status: FaultKind,
        count: int = 1,
        *,
        retry_after_s: float | None = None,
        retry_after_ms: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `count` requests with this fault, after any faults already queued.

        `retry_after_s` sets `Retry-After` (seconds), `retry_after_ms` sets `retry-after-ms`; `message`
        replaces the default error message.
        """
        _check_kind(status)
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        fault = _Fault(status, retry_after_s, retry_after_ms, message)
        with self._lock:
            self._controls.queued.extend([fault] * count)

    def set_fault_rate(
        self,
        rate: float,
        kinds: Sequence[FaultKind] = (429, 500, TIMEOUT),
        *,
        seed: int = 0,
        retry_after_s: float | None = None,
    ) -> None:
        """Fail this fraction of requests, each with a kind drawn from `kinds` by an RNG seeded with `seed`.

        `retry_after_s` is sent with the 429s. Queued `fail_next` faults come first.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, not {rate}")
        if not kinds:
            raise ValueError("kinds must name at least one fault")
        for kind in kinds:
            _check_kind(kind)
        with self._lock:
            self._controls.fault_rate, self._controls.fault_kinds = rate, tuple(kinds)
            self._controls.rng, self._controls.fault_retry_after_s = random.Random(seed), retry_after_s

    @property
    def latency_ms(self) -> int:
        """A fixed delay added before every answer, faults included."""
        with self._lock:
            return self._controls.latency_ms

    @latency_ms.setter
    def latency_ms(self, value: int) -> None:
        with self._lock:
            self._controls.latency_ms = value

    @property
    def reverse_data(self) -> bool:
        """Whether `data` lists the vectors last input first (legal: each item carries its `index`)."""
        with self._lock:
            return self._controls.reverse_data

    @reverse_data.setter
    def reverse_data(self, value: bool) -> None:
        with self._lock:
            self._controls.reverse_data = value

    def reset(self) -> None:
        """Back to as built: no faults, the first latency, input order, an empty log."""
        with self._lock:
            self._controls = _Controls(latency_ms=self._initial_latency_ms)

    # the request log

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in order of arrival (a copy)."""
        with self._lock:
            return sorted(self._controls.log, key=lambda request: request.arrived_s)

    @property
    def embedding_requests(self) -> list[RecordedRequest]:
        """The requests to `POST /v1/embeddings`."""
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/embeddings"]

    def clear_log(self) -> None:
        with self._lock:
            self._controls.log.clear()

    # serving (called from the handler threads)

    def _respond(self, request: _Request) -> _Answer:
        payload = _Payload.parse(request.body)
        answer = self._answer(request, payload)
        self._record(request, payload, answer)
        return answer

    def _answer(self, request: _Request, payload: _Payload) -> _Answer:
        fault = self._take_fault()
        if fault is None or fault.kind == TRUNCATED:
            return self._serve(request, payload, truncate=fault is not None)
        if isinstance(fault.kind, int):
            return _status_fault(fault, fault.kind)
        return _SPECIAL_FAULTS[fault.kind]

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            controls = self._controls
            if controls.queued:
                return controls.queued.popleft()
            if controls.fault_rate and controls.rng.random() < controls.fault_rate:
                return _Fault(controls.rng.choice(controls.fault_kinds), controls.fault_retry_after_s)
            return None

    def _serve(self, request: _Request, payload: _Payload, *, truncate: bool) -> _Answer:
        if (request.method, request.path) != ("POST", "/v1/embeddings"):
            return _error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if (denied := self._auth_failure(request.authorization)) is not None:
            return denied
        if (
            problem := _payload_problem(payload) or _length_problem(payload, self.max_input_tokens)
        ) is not None:
            return _invalid(problem)
        dims = payload.dimensions if isinstance(payload.dimensions, int) else self.default_dimensions
        return _embeddings(payload, dims, reverse=self.reverse_data, drop_last=truncate)

    def _auth_failure(self, authorization: str | None) -> _Answer | None:
        if self.api_key is None:
            return None
        given = _bearer(authorization)
        if given is None:
            return _error(401, _NO_KEY, "invalid_request_error")
        if given != self.api_key:
            message = f"Incorrect API key provided: {mask_key(given)}. {_KEY_HELP}"
            return _error(401, message, "invalid_request_error", "invalid_api_key")
        return None

    def _record(self, request: _Request, payload: _Payload, answer: _Answer) -> None:
        dims = payload.dimensions if isinstance(payload.dimensions, int) else None
        entry = RecordedRequest(
            arrived_s=request.arrived_s,
            method=request.method,
            path=request.path,
            model=payload.model if isinstance(payload.model, str) else None,
            inputs=payload.input_count,
            dimensions=dims,
            encoding_format=payload.encoding_format if isinstance(payload.encoding_format, str) else None,
            status=answer.logged_status,
            client_port=request.client_port,
        )
        with self._lock:
            self._controls.log.append(entry)


def _check_kind(kind: FaultKind) -> None:
    if isinstance(kind, int) and not 400 <= kind <= 599:
        raise ValueError(f"an injected status must be an HTTP error (400-599), not {kind}")
    if isinstance(kind, str) and kind not in (TIMEOUT, DISCONNECT, MALFORMED, TRUNCATED):
        raise ValueError(f"unknown fault {kind!r}")


# --- HTTP plumbing -------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: EmbeddingServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake the handler threads waiting on kept-alive connections, so that they end."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (its timeout) is routine here; anything else is a bug worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: no line on stderr per request."""

    def _handle(self) -> None:
        arrived_s = time.monotonic()
        request = _Request(
            arrived_s=arrived_s,
            method=self.command,
            path=self.path,
            authorization=self.headers.get("Authorization"),
            body=self._read_body(),
            client_port=int(self.client_address[1]),
        )
        answer = self.server.owner._respond(request)
        self._delay(self.server.owner.latency_ms)
        self._deliver(answer)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _delay(self, latency_ms: int) -> None:
        if latency_ms > 0:
            self.server.stopping.wait(latency_ms / 1000)

    def _deliver(self, answer: _Answer) -> None:
        if answer.action == "hold":
            self._hold()
        if answer.action != "send":
            self.close_connection = True
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)

    def _hold(self) -> None:
        deadline = time.monotonic() + self.server.owner.hold_s
        while time.monotonic() < deadline and not self.server.stopping.wait(0.02):
            if _peer_closed(self.connection):
                return


def _peer_closed(connection: socket.socket) -> bool:
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# --- pytest fixtures -----------------------------------------------------------------------------


class EmbeddingServerFactory:
    """Starts embedding servers on demand (one with a required key, say) and stops them all at the end."""

    def __init__(self) -> None:
        self._servers: list[EmbeddingServer] = []

    def __call__(
        self,
        *,
        api_key: str | None = None,
        dimensions: int = DEFAULT_DIMENSIONS,
        latency_ms: int = 0,
        hold_s: float = 30.0,
    ) -> EmbeddingServer:
        server = EmbeddingServer(api_key=api_key, dimensions=dimensions, latency_ms=latency_ms, hold_s=hold_s)
        self._servers.append(server.start())
        return server

    def close(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers.clear()


@pytest.fixture
def embedding_server() -> Iterator[EmbeddingServer]:
    """A started embedding server that needs no key, stopped after the test."""
    with EmbeddingServer() as server:
        yield server


@pytest.fixture
def embedding_server_factory() -> Iterator[EmbeddingServerFactory]:
    """A factory of started embedding servers, all stopped after the test."""
    factory = EmbeddingServerFactory()
    try:
        yield factory
    finally:
        factory.close()
