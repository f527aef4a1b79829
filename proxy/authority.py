"""Live authority: the decision record and the admission JSON are watched while serving.

The proxy starts only when both artifacts pass their gates, and it pins what it enforces
then (provider, model, provider class, aliases). An operator who revokes or rejects the
admission, changes its model or provider, changes the decision, or removes or breaks a
file must not need a restart for it to take effect: the files are watched (the path
watch of proxy.path_watch, with the files' own content changes; a stat comparison where
no watch can be had) and judged again on every change. A verdict that no longer allows
serving stops forwarding at once (``forward`` reads ``serving``), turns ``/readyz`` red
with the reason, updates ``case_proxy_admission_info`` and is recorded in the evidence;
a change back to an allowed state resumes. ``judge`` is pure; the watch only reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .admission import Admission, ArtifactError, DecisionRecord, evaluate_admission_gates, load_admission, load_decision
from .path_watch import PathWatch
from .readiness import cancel_task

log = logging.getLogger("case_proxy.authority")

# How often the watch is looked at. A flag test per file when inotify watches them, two
# stat calls per file otherwise: cheap enough to keep well inside the one second the
# operators were promised.
POLL_INTERVAL_S = 0.1


class AuthorityVerdict(BaseModel):
    """Whether the artifacts, as they read now, still allow serving the pinned model."""

    model_config = ConfigDict(frozen=True)

    serving: bool
    code: str  # "ok" or the first reason's stable code
    message: str
    provider: str | None = None
    model: str | None = None
    admission_status: str | None = None
    provider_class: str | None = None


def _pin(admission: Admission) -> tuple[str, str, str, tuple[str, ...]]:
    return admission.provider, admission.model, admission.provider_class, tuple(admission.aliases)


def judge(decision: DecisionRecord | ArtifactError, admission: Admission | ArtifactError,
          pinned: Admission) -> AuthorityVerdict:
    """The verdict on the artifacts as loaded (or the error loading them), against what
    the proxy pinned at start-up. Pure. Only a change between ``candidate`` and
    ``admitted`` keeps serving; a different provider, model, provider class or alias list
    stops it (a restart, with its start-up checks of the backend, takes that on)."""
    fields: dict[str, str | None] = {}
    if isinstance(admission, Admission):
        fields = {"provider": admission.provider, "model": admission.model,
                  "admission_status": admission.admission_status.value,
                  "provider_class": admission.provider_class}
    for loaded in (decision, admission):
        if isinstance(loaded, ArtifactError):
            return AuthorityVerdict(serving=False, code=loaded.code, message=loaded.problems[0], **fields)
    assert isinstance(decision, DecisionRecord) and isinstance(admission, Admission)
    failures = evaluate_admission_gates(decision, admission)
    if failures:
        return AuthorityVerdict(serving=False, code=failures[0].code,
                                message="; ".join(f.message for f in failures), **fields)
    if _pin(admission) != _pin(pinned):
        return AuthorityVerdict(
            serving=False, code="admission_changed",
            message=f"admission JSON now names provider '{admission.provider}', model '{admission.model}', "
            f"provider_class '{admission.provider_class}', aliases {list(admission.aliases)}; this proxy was "
            f"started for provider '{pinned.provider}', model '{pinned.model}', aliases {list(pinned.aliases)}: "
            "restart it to serve another admission", **fields)
    return AuthorityVerdict(serving=True, code="ok", message=ok_message(admission.admission_status.value), **fields)


def ok_message(status: str) -> str:
    return f"admission '{status}' and decision allow serving"


def read_verdict(decision_path: Path, admission_path: Path, pinned: Admission) -> AuthorityVerdict:
    """Load both files and judge them; every load error becomes a verdict."""
    def load(loader: Callable[[Path], object], path: Path) -> object:
        try:
            return loader(path)
        except ArtifactError as exc:
            return exc
    decision = load(load_decision, decision_path)
    admission = load(load_admission, admission_path)
    return judge(decision, admission, pinned)  # type: ignore[arg-type]


_Signature = tuple[int, int, int, int, int] | None


def _signature(path: Path) -> _Signature:
    """What a stat says about a file: a changed value means it may have changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Watched:
    """One artifact: its path watch (directory entries and content), and a stat
    signature, compared on every look where no watch could be had."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.watch = PathWatch.open(path, content=True)
        self.signature = _signature(path)

    def changed(self) -> bool:
        if self.watch is not None:
            return self.watch.changed()
        now = _signature(self.path)
        changed, self.signature = now != self.signature, now
        return changed

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


OnChange = Callable[[AuthorityVerdict, AuthorityVerdict], None]


class Authority:
    """The current verdict on the artifacts, kept up to date while the proxy serves.
    ``on_change(old, new)`` callbacks run on every change of verdict (not on a rewrite
    that leaves it as it was)."""

    def __init__(self, decision_path: Path, admission_path: Path, pinned: Admission,
                 interval_s: float = POLL_INTERVAL_S) -> None:
        self._paths = (decision_path, admission_path)
        self._pinned = pinned
        self._interval = interval_s
        self._files = [_Watched(decision_path), _Watched(admission_path)]
        for f in self._files:
            if f.watch is not None:
                f.watch.changed()  # its first answer is always True; the verdict below is current
        # What start-up checked (its gates passed on these pins); ``start`` judges the
        # files again at once, so a change made since then is seen and recorded too.
        self.verdict = AuthorityVerdict(
            serving=True, code="ok", message=ok_message(pinned.admission_status.value),
            provider=pinned.provider, model=pinned.model, admission_status=pinned.admission_status.value,
            provider_class=pinned.provider_class)
        self.serving = True
        self.on_change: list[OnChange] = []
        self._task: asyncio.Task[None] | None = None

    def poll(self) -> bool:
        """Judge again if either file may have changed; True if the verdict changed."""
        changed = [f.changed() for f in self._files]  # both asked: each resets its flag
        if not any(changed) and self.serving == self.verdict.serving:
            return False
        return self.refresh()

    def refresh(self) -> bool:
        new = read_verdict(*self._paths, self._pinned)
        old = self.verdict
        stopped_by_failure = self.serving != old.serving  # a failed check stopped it (see _loop)
        self.verdict, self.serving = new, new.serving
        if new == old:
            return stopped_by_failure
        if new.serving != old.serving:
            log.warning("authority changed: %s (%s: %s)", "serving resumes" if new.serving else "forwarding STOPPED",
                        new.code, new.message)
        for cb in self.on_change:
            try:
                cb(old, new)
            except Exception:  # noqa: BLE001 - one failing observer must not stop the watch
                log.exception("authority change observer failed")
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive any one failure, closed
                log.exception("authority check failed; forwarding stops until a check succeeds")
                self.serving = False

    def start(self) -> None:
        self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="case-proxy-authority")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        for f in self._files:
            f.close()


def info_labels(verdict: AuthorityVerdict) -> tuple[str, str, str, str] | None:
    """The ``case_proxy_admission_info`` label set for a verdict (None when the admission
    could not be read)."""
    if verdict.provider is None or verdict.model is None or verdict.admission_status is None \
            or verdict.provider_class is None:
        return None
    return verdict.provider, verdict.model, verdict.admission_status, verdict.provider_class
