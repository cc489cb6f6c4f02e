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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Entry:
    joined: float  # time.monotonic() at the join
    units: float  # the job's work in image-steps, from what it asked for (for the waiting time estimate)


class SessionJobs:
    """GPU jobs per session, waiting or running: ``session -> {event_id or ticket: Entry}``.

    A join reserves a ticket before Gradio sees it (so two joins at once cannot both pass the cap), which becomes
    the event id once Gradio accepts it, or is dropped when Gradio refuses. Thread-safe: the middleware runs on
    the event loop, the status line's reads in worker threads.
    """

    def __init__(self, cap: int = 1, stale_after_s: float = 3 * 3600):
        self.cap = max(1, int(cap))
        self.stale_after_s = stale_after_s
        # fn_index of each event that joins the GPU queue -> its work estimate from the join's data
        self.gpu_fns: dict[int, Callable[[list], float]] = {}
        self._held: dict[str, dict[str, Entry]] = {}
        self._early: OrderedDict[str, None] = OrderedDict()  # completed before their join was answered
        self._refused: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def count(self, session: str) -> int:
        with self._lock:
            return len(self._held.get(session, {}))

    def reserve(self, session: str, units: float = 0.0) -> str | None:
        """A ticket for one more job of ``session``, or None when it already has ``cap``."""
        now = time.monotonic()
        with self._lock:
            held = self._held.setdefault(session, {})
            for key, entry in list(held.items()):
                if now - entry.joined > self.stale_after_s:
                    del held[key]
            if len(held) >= self.cap:
                return None
            ticket = f"ticket-{uuid.uuid4().hex}"
            held[ticket] = Entry(now, units)
            return ticket

    def bind(self, session: str, ticket: str, event_id: str | None) -> None:
        """Gradio accepted the job as ``event_id`` (None: refused, the ticket goes)."""
        with self._lock:
            held = self._held.get(session, {})
            entry = held.pop(ticket, None)
            if event_id in self._early:  # it already finished
                del self._early[event_id]
            elif event_id and entry is not None:
                held[event_id] = entry
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

    def refused(self, session: str, detail: str) -> None:
        """A join of ``session`` was turned away (its cap, or a full queue), for its status line."""
        with self._lock:
            self._refused[session] = (time.monotonic(), detail)
            while len(self._refused) > 1024:
                del self._refused[next(iter(self._refused))]

    def refusal_since(self, session: str, since: float) -> str | None:
        with self._lock:
            when, detail = self._refused.get(session, (0.0, ""))
        return detail if when >= since else None

    def line(self, session: str) -> tuple[list[tuple[str, float]], float] | None:
        """The jobs ahead of ``session``'s oldest job, as (session, units), and that job's own units; None when
        the session has no job in the queue."""
        with self._lock:
            everyone = [(e.joined, s, e.units) for s, held in self._held.items() for e in held.values()]
        mine = sorted(j for j in everyone if j[1] == session)
        if not mine:
            return None
        return [(s, units) for joined, s, units in sorted(everyone) if joined < mine[0][0]], mine[0][2]

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
        session, fn, data = _join_fields(body)
        ticket = None
        if session and fn in self.jobs.gpu_fns:
            ticket = self.jobs.reserve(session, _units(self.jobs.gpu_fns[fn], data))
            if ticket is None:
                self.jobs.refused(session, BUSY_SESSION)
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
            elif ticket:  # Gradio turned it away: "Queue is full", say
                self.jobs.refused(session, str(_json(answer["body"]).get("detail") or "The queue refused it."))
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


def _join_fields(body: bytes) -> tuple[str | None, int | None, list]:
    fields = _json(body)
    session, fn, data = fields.get("session_hash"), fields.get("fn_index"), fields.get("data")
    return ((session if isinstance(session, str) else None), (fn if isinstance(fn, int) else None),
            (data if isinstance(data, list) else []))


def _units(estimate: Callable[[list], float], data: list) -> float:
    """The job's work from its inputs, for time estimates only: whatever a client sent, never an error here
    (Gradio checks the values itself)."""
    try:
        return max(0.0, float(estimate(data)))
    except Exception:
        return 0.0


async def _send_json(send, status: int, payload: dict) -> None:
    raw = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})
