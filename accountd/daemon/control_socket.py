"""The control socket itself: creating it safely, and who is on the other end.

Creating: the path is checked before anything is removed. Nothing at the path: fine. A socket
nobody answers on (a daemon that was killed): removed as stale. A socket somebody answers on:
refused ("another accountd is listening"). A symbolic link, a regular file, a directory or
anything else: refused untouched, because deleting what an operator or an attacker put there is
never ours to decide. The new socket is bound, given its mode (0660) and group, and only then
listens (`asyncio`'s ``create_server`` calls ``listen()``); a connect before ``listen()`` is
refused by the kernel, so no client ever reaches it with the umask's permissions.

Who: every request's peer is read from the kernel (``SO_PEERCRED``: pid, uid, primary gid; and
``SO_PEERGROUPS`` for the supplementary groups where the kernel has it, Linux 4.13+), never from
anything the client says. `role_of` turns that into admin, read-only or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from accountd.errors import ConfigError
from accountd.settings import ControlSettings

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
# Not exported by Python's socket module; the value is the same on every Linux architecture.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_LIVENESS_TIMEOUT = 2.0


class Role(IntEnum):
    """What a peer may do: read-only endpoints need `readonly`, mutating ones `admin`."""

    none = 0
    readonly = 1
    admin = 2


@dataclass(frozen=True, slots=True)
class Peer:
    """The process on the other end of a control connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def operator_id(self) -> str:
        """What goes into ``account_status_logs.operator_id`` (VARCHAR(36))."""
        return f"uid:{self.uid}"

    @property
    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *self.groups))


@dataclass(frozen=True, slots=True)
class Acl:
    """Who may use the control socket ([control] admin_uids/gids, readonly_uids/gids)."""

    admin_uids: frozenset[int] = frozenset()
    admin_gids: frozenset[int] = frozenset()
    readonly_uids: frozenset[int] = frozenset()
    readonly_gids: frozenset[int] = frozenset()
    own_uid: int = -1  # the daemon's own uid (always admin)

    @classmethod
    def from_settings(cls, control: ControlSettings) -> Acl:
        return cls(
            frozenset(control.admin_uids),
            frozenset(control.admin_gids),
            frozenset(control.readonly_uids),
            frozenset(control.readonly_gids),
            os.getuid(),
        )


def role_of(peer: Peer, acl: Acl) -> Role:
    """root and the daemon's own uid are always admins; then the lists, admin first."""
    if peer.uid in (0, acl.own_uid) or peer.uid in acl.admin_uids:
        return Role.admin
    gids = peer.all_gids
    if gids & acl.admin_gids:
        return Role.admin
    if peer.uid in acl.readonly_uids or gids & acl.readonly_gids:
        return Role.readonly
    return Role.none


def peer_of(sock: Any) -> Peer | None:
    """The peer of a connected AF_UNIX socket (or asyncio's TransportSocket wrapping one)."""
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: Any) -> tuple[int, ...]:
    size = 64
    while size <= 65536:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than the buffer holds
                size *= 4
                continue
            return ()  # an old kernel: the primary gid (from SO_PEERCRED) still counts
        count = len(raw) // 4
        return struct.unpack(f"{count}I", raw[: count * 4])
    return ()


def resolve_group(group: str | None) -> int | None:
    """The gid for ``[control] group`` (a name or a number); None keeps the daemon's group."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"config error: control.group: no such group {group!r}") from None


async def bind_control_socket(
    path: Path, *, group: str | None = None, mode: int = SOCKET_MODE
) -> socket.socket:
    """A bound (not yet listening) AF_UNIX socket at ``path`` with ``mode`` and ``group``.

    Raises `ConfigError` (naming ``control.socket``/``control.group``) when something other than
    a stale socket is in the way or the group cannot be set.
    """
    gid = resolve_group(group)
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"config error: control.socket: path longer than 107 bytes: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    await remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(os.fspath(path))
        except OSError as exc:
            # EADDRINUSE: something appeared between the check and the bind; never clobber it.
            raise ConfigError(f"config error: control.socket: cannot bind {path}: {exc}") from None
        try:
            # Before listen(): until then every connect is refused, whatever the umask gave.
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
        except PermissionError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ConfigError(
                f"config error: control.group: cannot give {path} to group {group!r} "
                "(the daemon's user must be root or a member of that group)"
            ) from None
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def remove_stale_socket(path: Path) -> None:
    """Remove a socket nobody answers on; refuse anything else that is in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"config error: control.socket: {path} is a symbolic link; refusing to follow or "
            "remove it (remove it yourself if it is not needed)"
        )
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise ConfigError(
            f"config error: control.socket: {path} exists and is {kind}; refusing to remove it"
        )
    if await socket_answers(path):
        raise ConfigError(
            f"config error: control.socket: another accountd is listening on {path}; "
            "stop it first or configure another socket path"
        )
    os.unlink(path)
    log.info("removed stale control socket %s (nothing was listening on it)", path)


async def socket_answers(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at ``path``."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(os.fspath(path)), _LIVENESS_TIMEOUT
        )
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog is a busy listener, not a dead one
    except PermissionError:
        raise ConfigError(
            f"config error: control.socket: {path} exists and we may not connect to it, so we "
            "cannot tell whether it is in use; refusing to remove it"
        ) from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def unlink_if_ours(path: Path, inode: tuple[int, int] | None) -> None:
    """Remove the socket at shutdown, but only if it is still the one we created."""
    if inode is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


def inode_of(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
