"""One error table per backend: which of its exceptions are worth a retry and which no retry will fix.
An exception no table names is *unknown*: the delivery engine retries it on its capped schedule and logs
its traceback at WARNING once per sink and error type."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from flightlog.proto.errors import (
    BackendError,
    PermanentBackendError,
    RetryableBackendError,
)

__all__ = ["ErrorTable", "Rule", "chain"]

Verdict = Literal["retryable", "permanent"]


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes / contexts, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@dataclass(frozen=True)
class Rule:
    """Exceptions of ``types`` (anywhere in the cause chain when ``causes``), optionally only when ``when``
    holds for it, get ``verdict``."""

    types: tuple[type[BaseException], ...]
    verdict: Verdict
    when: Callable[[BaseException], bool] | None = None
    causes: bool = False


class ErrorTable:
    """A backend's rules, first match wins; ``classify`` returns the flightlog error, or None (unknown)."""

    def __init__(self, backend: str, rules: Sequence[Rule]) -> None:
        self.backend = backend
        self.rules = list(rules)

    def verdict(self, exc: BaseException) -> Verdict | None:
        if isinstance(exc, PermanentBackendError):
            return "permanent"
        if isinstance(exc, RetryableBackendError):
            return "retryable"
        for rule in self.rules:
            for e in (chain(exc) if rule.causes else (exc,)):
                if isinstance(e, rule.types) and (rule.when is None or rule.when(e)):
                    return rule.verdict
        return None

    def classify(self, exc: BaseException, what: str) -> BackendError | None:
        verdict = self.verdict(exc)
        if verdict is None:
            return None
        if isinstance(exc, BackendError):
            return exc
        text = f"{self.backend} {'refused' if verdict == 'permanent' else 'failed'} {what}: " \
               f"{type(exc).__name__}: {_short(exc)}"
        return PermanentBackendError(text) if verdict == "permanent" else RetryableBackendError(text)

    def translate(self, exc: BaseException, what: str) -> BaseException:
        """What to raise for ``exc``: the flightlog error, or ``exc`` itself when unknown."""
        err = self.classify(exc, what)
        return exc if err is None else err


def _short(exc: BaseException, limit: int = 500) -> str:
    s = str(exc)
    return s if len(s) <= limit else s[:limit] + "…"
