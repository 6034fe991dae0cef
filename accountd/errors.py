"""The project's exceptions.

One root (`AccountdError`) and subclasses that map to what happens next, in the manner of
Home Assistant's ``ConfigEntryNotReady``/``ConfigEntryAuthFailed``: a *transient* error means back
off and try again, *needs a human* means a QR login is required, *fatal* means the account goes to
``error``. Control-API errors carry a stable code (see `ControlError`).
"""

from __future__ import annotations


class AccountdError(Exception):
    """Root of every error accountd raises on purpose."""


class ConfigError(AccountdError):
    """The configuration is invalid; the message names the key."""


class DatabaseUnavailable(AccountdError):
    """A database cannot be reached (transient: the caller retries with backoff)."""

    def __init__(self, database: str, detail: str) -> None:
        super().__init__(f"database {database!r} is unreachable: {detail}")
        self.database = database
        self.detail = detail


class IllegalTransition(AccountdError):
    """A trigger that the transition table does not allow from the current state."""

    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"trigger {trigger!r} is not allowed from state {state!r}")
        self.state = state
        self.trigger = trigger


class UnknownAccount(AccountdError):
    """No supervised account has this id (or wework_guid)."""

    def __init__(self, account: str) -> None:
        super().__init__(f"unknown account {account!r}")
        self.account = account


class WorkerError(AccountdError):
    """Base of errors reported by (or about) a worker."""


class WorkerTransient(WorkerError):
    """The worker is down, timed out or answered 5xx: back off and retry."""


class WorkerRejected(WorkerError):
    """The worker refused the request (4xx): retrying the same call will not help."""


class ControlError(AccountdError):
    """An error of the control API with a stable string code (see docs/control-api.md)."""

    def __init__(self, code: str, message: str, *, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


class Overloaded(AccountdError):
    """The daemon cannot take more input right now (buffer full, database down): retry later."""

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason
