"""Each tab's status line: what the last action came to, kept until the next action.

A toast fades; the status line keeps "Waiting: 1 job ahead of yours, about 20 s", the progress bar of the running
job, "Done in 4.2 s", "Stopped after step 3 of 30" or the error sentence naming the photo it is about, until the
person does something else on that tab. The handlers write to a ``StatusBoard`` keyed by (session, tab); the
page reads it: right after each action, and once a second while a job is waiting or running (a ``gr.Timer``).

Time estimates come from the jobs ahead (their work in image-steps, from what they asked for) and ``Pace``, the
measured seconds per image-step on this server, so they follow the real hardware and the real queue.
"""

from __future__ import annotations

import html
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

FINAL = ("idle", "done", "stopped", "error")


@dataclass(frozen=True)
class Status:
    """One tab's state for one session. ``done``/``total`` are steps; ``units`` the job's work in image-steps."""

    phase: str = "idle"  # idle | sent | reading | running | done | stopped | error
    message: str = ""
    done: int = 0
    total: int = 0
    units: float = 0.0
    since: float = 0.0  # when this phase began (time.monotonic)
    stepping_since: float | None = None  # the first denoising step

    @property
    def final(self) -> bool:
        return self.phase in FINAL


class StatusBoard:
    """``(session, tab) -> Status`` for the most recent sessions. Thread-safe; never holds images or prompts."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], Status] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: str | None, tab: str) -> Status:
        with self._lock:
            return self._entries.get((session or "", tab), Status())

    def set(self, session: str | None, tab: str, status: Status) -> Status:
        if not session:  # a call without a session (a direct API call) has nobody to show a status to
            return status
        with self._lock:
            self._entries[(session, tab)] = status
            self._entries.move_to_end((session, tab))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return status

    def update(self, session: str | None, tab: str, **fields) -> Status:
        with self._lock:
            current = self._entries.get((session or "", tab), Status())
        return self.set(session, tab, replace(current, **fields))

    def stop_waiting(self, session: str | None) -> None:
        """Stop was pressed: a job of ``session`` that has not started yet never will."""
        with self._lock:
            for (key, tab), status in list(self._entries.items()):
                if key == session and status.phase == "sent":
                    self._entries[(key, tab)] = replace(status, phase="stopped",
                                                        message="Stopped before it started.")

    def running(self, session: str) -> Status | None:
        """The session's running job, if any (any tab)."""
        with self._lock:
            found = [s for (key, _tab), s in self._entries.items() if key == session and s.phase == "running"]
        return found[0] if found else None


class Pace:
    """Measured seconds per image-step (one image, one denoising step): a running average over finished jobs."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.seconds_per_unit: float | None = None
        self._lock = threading.Lock()

    def record(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        with self._lock:
            value = seconds / units
            old = self.seconds_per_unit
            self.seconds_per_unit = value if old is None else (1 - self.weight) * old + self.weight * value

    def seconds(self, units: float) -> float | None:
        return None if self.seconds_per_unit is None else units * self.seconds_per_unit


def duration(seconds: float) -> str:
    """4.2 -> "4.2 s", 75 -> "1 min 15 s": how long, in words a person reads at a glance."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min" + (f" {rest} s" if rest else "")


@dataclass(frozen=True)
class QueueView:
    """What a waiting person is told: jobs ahead, and seconds until theirs starts and until it is done (None
    while nothing has been measured yet)."""

    ahead: int
    starts_in: float | None
    takes: float | None


def render(status: Status, queue: QueueView | None = None, now: float | None = None) -> str:
    """The status line as HTML (every message escaped: Gradio renders it as HTML)."""
    now = time.monotonic() if now is None else now
    text = html.escape(status.message, quote=False)
    if status.phase == "idle":
        return ""
    if status.phase == "error":
        return f'<div class="status status-error" role="alert"><strong>Not done.</strong> {text}</div>'
    if status.phase in ("done", "stopped"):
        return f'<div class="status status-{status.phase}" role="status">{text}</div>'
    if status.phase == "sent":
        return f'<div class="status status-waiting" role="status">{_waiting(queue)}</div>'
    if status.phase == "reading" or not status.total:
        return f'<div class="status status-running" role="status">{text or "Starting..."}</div>'
    share = status.done / status.total
    line = f"Step {status.done} of {status.total}"
    if status.done > 1 and status.stepping_since is not None:  # timed from the end of step 1
        left = (now - status.stepping_since) / (status.done - 1) * (status.total - status.done)
        line += f" · about {duration(left)} left"
    return (f'<div class="status status-running" role="status"><div class="status-bar" role="progressbar" '
            f'aria-valuenow="{status.done}" aria-valuemin="0" aria-valuemax="{status.total}">'
            f'<div style="width: {100 * share:.0f}%"></div></div>{line}</div>')


def _waiting(queue: QueueView | None) -> str:
    if queue is None:
        return "Sending your request..."
    if queue.ahead == 0:
        line = "Your job is next in the queue"
    else:
        line = f"Waiting: {queue.ahead} job{'s' if queue.ahead > 1 else ''} ahead of yours"
    if queue.starts_in is None:
        return line + " (a time estimate appears once this server has finished a job)."
    if queue.ahead == 0:
        return line + f"; it takes about {duration(queue.takes or 0)}."
    return line + f"; yours starts in about {duration(queue.starts_in)} and takes about {duration(queue.takes or 0)}."


class JobReport:
    """One handler call's progress on the board: the step callback, then its end. Per call, never shared."""

    def __init__(self, board: StatusBoard, pace: Pace, session: str | None, tab: str, units: float,
                 forward: Callable[[int, int], None], starting: str = "Starting..."):
        self.board, self.pace, self.session, self.tab, self.units = board, pace, session, tab, units
        self.forward = forward  # Gradio's progress (what API clients see)
        self.started = time.monotonic()
        self.done = self.total = 0
        self.first_step: float | None = None  # when step 1 ended: the steps after it are timed
        self.last_step: float | None = None
        board.set(session, tab, Status("reading", starting, units=units, since=self.started))

    def step(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.first_step = now if self.first_step is None else self.first_step
        self.done, self.total, self.last_step = done, total, now
        self.board.update(self.session, self.tab, phase="running", done=done, total=total,
                          stepping_since=self.first_step)
        self.forward(done, total)

    def finished(self, message: str = "") -> None:
        self._measure()
        text = f"Done in {duration(time.monotonic() - self.started)}" + (f": {message}" if message else ".")
        self.board.update(self.session, self.tab, phase="done", message=text, since=time.monotonic())

    def failed(self, message: str, stopped: bool = False) -> None:
        self._measure()
        if stopped:
            message = (f"Stopped after step {self.done} of {self.total}." if self.total
                       else "Stopped before the first step.")
        self.board.update(self.session, self.tab, phase="stopped" if stopped else "error", message=message,
                          since=time.monotonic())

    def _measure(self) -> None:
        """Seconds per image-step from the steps after the first (step 1 also pays for warm-up)."""
        if self.first_step is not None and self.last_step is not None and self.total and self.done > 1:
            steps = self.done - 1
            self.pace.record(self.units * steps / self.total, self.last_step - self.first_step)
