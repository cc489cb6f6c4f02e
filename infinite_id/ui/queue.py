"""Who may join the GPU queue, and how a running job is stopped: per-session job cap and cooperative cancel.

Gradio bounds its queue as a whole (``max_size``) and runs ``concurrency_limit`` jobs of a ``concurrency_id`` at
once, but has no per-person bound: one script could fill the whole queue. ``SessionJobs`` counts each browser
session's GPU jobs (waiting or running) and ``SessionCap``, a plain ASGI middleware handed to FastAPI through
``launch(app_kwargs={"middleware": [...]})``, refuses a join over the cap with HTTP 400 and ``BUSY_SESSION``, as
Gradio's own refusals look. It only reads what crosses the wire:

* ``POST .../queue/join`` (``session_hash``, ``fn_index``; the answer carries the ``event_id``) counts a job in;
* ``GET .../queue/data?session_hash=...`` (the session's event stream) counts it out when its
  ``process_completed`` message passes, whatever ended it: a result, an error, a range check before the handler,
  a Stop. A stream that ends without ``close_stream`` (the browser went away) releases all of that session's jobs;
* an entry older than ``stale_after_s`` is dropped, a last resort, so a session is never locked out for good.
  (Stop needs nothing of its own: the browser's cancel ends the job's event, whose end passes the stream.)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from urllib.parse import parse_qs

GPU = "gpu"  # the concurrency id of every event that runs the pipeline
BUSY_SESSION = ("You already have a generation waiting or running. Wait for it to finish (or press Stop) before "
                "starting another, so everyone in the queue gets a turn.")


class Jobs:
    """Cooperative cancel: one flag per browser session's running job.

    Gradio's cancel stops waiting for a handler, but the handler's thread runs on to the end, holding the GPU
    slot. The Stop button also sets this flag, which the step callback checks, so the pipeline call ends at the
    next step. Every job gets a fresh flag, so a cancel never leaks into the next job.
    """

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str | None):
        flag = threading.Event()
        key = session or uuid.uuid4().hex
        with self._lock:
            self._flags[key] = flag
        try:
            yield flag
        finally:
            with self._lock:
                if self._flags.get(key) is flag:
                    del self._flags[key]

    def cancel(self, session: str | None) -> bool:
        with self._lock:
            flag = self._flags.get(session or "")
        if flag is not None:
            flag.set()
        return flag is not None


class SessionJobs:
    """GPU jobs per session, waiting or running: ``session -> {event_id or ticket: joined_at}``.

    A join reserves a ticket before Gradio sees it (so two joins at once cannot both pass the cap), which becomes
    the event id once Gradio accepts it, or is dropped when Gradio refuses. Thread-safe: the middleware runs on
    the event loop, the Stop handler in a worker thread.
    """

    def __init__(self, cap: int = 1, stale_after_s: float = 3 * 3600):
        self.cap = max(1, int(cap))
        self.stale_after_s = stale_after_s
        self.gpu_fns: set[int] = set()  # the fn_index of each event that joins the GPU queue
        self._held: dict[str, dict[str, float]] = {}
        self._early: OrderedDict[str, None] = OrderedDict()  # completed before their join was answered
        self._lock = threading.Lock()

    def count(self, session: str) -> int:
        with self._lock:
            return len(self._held.get(session, {}))

    def reserve(self, session: str) -> str | None:
        """A ticket for one more job of ``session``, or None when it already has ``cap``."""
        now = time.monotonic()
        with self._lock:
            held = self._held.setdefault(session, {})
            for key, joined in list(held.items()):
                if now - joined > self.stale_after_s:
                    del held[key]
            if len(held) >= self.cap:
                return None
            ticket = f"ticket-{uuid.uuid4().hex}"
            held[ticket] = now
            return ticket

    def bind(self, session: str, ticket: str, event_id: str | None) -> None:
        """Gradio accepted the job as ``event_id`` (None: refused, the ticket goes)."""
        with self._lock:
            held = self._held.get(session, {})
            joined = held.pop(ticket, None)
            if event_id in self._early:  # it already finished
                del self._early[event_id]
            elif event_id and joined is not None:
                held[event_id] = joined
            self._forget_if_empty(session)

    def finish(self, session: str, event_id: str) -> None:
        with self._lock:
            held = self._held.get(session, {})
            if held.pop(event_id, None) is None:
                self._early[event_id] = None  # its join answer may still be on its way
                while len(self._early) > 256:
                    self._early.popitem(last=False)
            self._forget_if_empty(session)

    def release(self, session: str | None) -> None:
        """Every job of ``session``: its browser went away."""
        with self._lock:
            held = self._held.get(session or "", {})
            for key in [k for k in held if not k.startswith("ticket-")]:
                del held[key]
            self._forget_if_empty(session or "")

    def _forget_if_empty(self, session: str) -> None:
        if not self._held.get(session, True):
            del self._held[session]


class SessionCap:
    """ASGI middleware: the per-session cap at the queue's door (see the module docstring)."""

    def __init__(self, app, jobs: SessionJobs):
        self.app, self.jobs = app, jobs

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/queue/join"):
            return await self._join(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].endswith("/queue/data"):
            return await self._stream(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _join(self, scope, receive, send):
        body = await _read_body(receive)
        session, fn = _join_fields(body)
        ticket = None
        if session and fn in self.jobs.gpu_fns:
            ticket = self.jobs.reserve(session)
            if ticket is None:
                return await _send_json(send, 400, {"detail": BUSY_SESSION})
        answer = {"status": 0, "body": b""}

        async def capture(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")
            await send(message)

        event_id = None
        try:
            await self.app(scope, _replay(body, receive), capture if ticket else send)
            if ticket and answer["status"] == 200:
                event_id = _json(answer["body"]).get("event_id")
        finally:
            if ticket:
                self.jobs.bind(session, ticket, event_id)

    async def _stream(self, scope, receive, send):
        session = (parse_qs(scope.get("query_string", b"").decode()).get("session_hash") or [""])[0]
        seen = {"buffer": "", "closed": False}

        async def watch(message):
            if message["type"] == "http.response.body" and session:
                seen["buffer"] += message.get("body", b"").decode("utf-8", "replace")
                *events, seen["buffer"] = seen["buffer"].split("\n\n")
                for event in events:
                    data = _json(event.removeprefix("data:").strip().encode()) if event.startswith("data:") else {}
                    if data.get("msg") == "process_completed" and data.get("event_id"):
                        self.jobs.finish(session, data["event_id"])
                    elif data.get("msg") == "close_stream":
                        seen["closed"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if session and not seen["closed"]:  # the browser went away: Gradio dropped its waiting jobs too
                self.jobs.release(session)


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False) and message["type"] == "http.request"
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then the client's own messages (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _join_fields(body: bytes) -> tuple[str | None, int | None]:
    data = _json(body)
    session, fn = data.get("session_hash"), data.get("fn_index")
    return (session if isinstance(session, str) else None), (fn if isinstance(fn, int) else None)


async def _send_json(send, status: int, payload: dict) -> None:
    raw = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})
