"""The domain's name table as this process sees it: callback and task names,
and the codec recorded for each callback (docs/contract.md "Codecs").

A :class:`NameTable` belongs to one :class:`~shm_taskwork.Domain` (which
owns it); it remembers which ids this process has put, and the codecs the
segment records (a recorded codec never changes). Names read from a segment
were written by whoever can write it: they are shown through
:func:`printable`, never raw.
"""
from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Any

from . import _security, callbacks
from . import codec as _codec
from ._native import ffi, lib
from .callbacks import TASK_NAME_PREFIX
from .errors import DomainCorruptError
from .part import DomainPart

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("shm_taskwork")


def printable(text: str) -> str:
    """``text`` as a terminal or a log may show it: every character Python
    calls not printable (C0 and C1 controls such as ESC, BEL and CR, DEL,
    line separators, bidirectional overrides) written as its escape
    (``\\x1b``, ``\\u202e``), and a backslash doubled, so what is shown can be
    told apart from an escape. Names read from a segment were written by
    whoever can write it (README, Security): the tools and the logs show
    them through this, never raw."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else
                       f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


class NameTable(DomainPart):
    """The callback-name table of one domain, and the codecs it records."""

    def __init__(self, dom: "Domain"):
        super().__init__(dom)
        self.put_ids: set[int] = set()    # ids this process has put in the table
        self._codecs: dict[int, str] = {}   # id -> codec the name table records (never changes)

    # ---- names ------------------------------------------------------------

    def put(self, fid: int, name: str) -> None:
        """Record a callback's (or task's) name, and the codec this process
        declared for it: a conflicting codec is a ValueError and pickle in a
        domain others can write a PermissionError (docs/contract.md "Codecs")."""
        if fid in self.put_ids:
            return
        declared = callbacks.codec_of(fid)
        if declared == "pickle":
            self.refuse_pickle(name)
        raw = name.encode()
        rc = lib.tw_name_put(self._dom.d, fid, raw, len(raw))
        if rc == 0:
            if declared is not None:
                self.record_codec(fid, name, declared, strict=True)
            self.put_ids.add(fid)
        # ENOSPC: the table is full; the work still runs, tools show the id
        # (and a sender that knows only the name cannot learn its codec).

    def func_name(self, fid: int) -> str:
        """The name of callback ``fid``: the one this process knows, else the
        table's, else ``<unknown 0x...>``."""
        local = callbacks.name_of(fid)
        if local is not None:
            return local
        buf = ffi.new("char[]", 128)
        n = lib.tw_name_get(self._dom.d, fid, buf, 128)
        if n >= 0:
            return ffi.string(buf, n).decode(errors="replace")
        return f"<unknown {fid:#018x}>"

    def name_of(self, name_id: int) -> str | None:
        """The name stored under ``name_id`` (a task's without its prefix);
        None for 0 or a name not in the table."""
        if not name_id:
            return None
        buf = ffi.new("char[]", lib.TW_FUNC_NAME_LEN)
        n = lib.tw_name_get(self._dom.d, name_id, buf, lib.TW_FUNC_NAME_LEN)
        if n < 0:
            return None
        raw = ffi.unpack(buf, n).decode(errors="replace")
        return raw[len(TASK_NAME_PREFIX):] if raw.startswith(TASK_NAME_PREFIX) else raw

    def known(self, name_id: int) -> bool:
        """True if the table holds a name under ``name_id``."""
        buf = ffi.new("char[]", lib.TW_FUNC_NAME_LEN)
        return lib.tw_name_get(self._dom.d, name_id, buf, lib.TW_FUNC_NAME_LEN) >= 0

    # ---- codecs (docs/contract.md "Codecs") ------------------------------------

    def refuse_pickle(self, name: str) -> None:
        """PermissionError if another user can write this domain: unpickling
        what it holds would run whatever code they wrote."""
        why = _security.other_writers(self._dom)
        if why is not None:
            raise PermissionError(
                errno.EACCES, f"callback {name!r} uses codec 'pickle', which runs code named by "
                f"the payload, so it is refused in domain {self._dom.name!r}: {why}; use codec "
                f"'json' or 'msgpack', or a domain only this user can write (mode 0o600)")

    def record_codec(self, fid: int, name: str, codec: str, *, strict: bool) -> None:
        """Record ``codec`` for the name ``fid`` (already in the table). The
        first declaration wins; a different one already recorded is a
        ValueError when ``strict``, else logged (a declaration recorded in
        passing, when a domain is opened or a callback declared)."""
        dom = self._dom
        rc = lib.tw_name_set_codec(dom.d, fid, _codec.CODEC_IDS[codec])
        if rc == -errno.EUCLEAN:
            raise DomainCorruptError(f"domain {dom.name!r}: the codec recorded for callback "
                                     f"{name!r} is not one this build knows (scribbled)")
        if rc < 0:  # ENOENT: never after tw_name_put returned 0 (it left the name whole)
            return
        have = _codec.CODEC_NAMES[rc]
        if have is not None:
            self._codecs[fid] = have
        if have != codec:
            text = (f"callback {name!r} is declared with codec {codec!r} in this process, but "
                    f"domain {dom.name!r} records codec {have!r} for it (the first declaration "
                    f"wins): declare the same codec everywhere")
            if strict:
                raise ValueError(text)
            log.warning("%s", text)

    def record_declared(self, fid: int, name: str, codec: str) -> None:
        """Record a codec this process declared, in passing (this domain is
        opened, or the callback declared while it is open): never raises;
        pickle is not recorded in a domain others can write."""
        dom = self._dom
        try:
            if dom._closed or (codec == "pickle" and _security.other_writers(dom)):
                return
            raw = name.encode()
            if lib.tw_name_put(dom._d, fid, raw, len(raw)) == 0:
                self.record_codec(fid, name, codec, strict=False)
        except Exception as exc:  # pragma: no cover - a scribbled table: the put says so
            log.warning("domain %r: cannot record the codec of callback %r: %s",
                        dom.name, name, exc)

    def codec(self, fid: int) -> str | None:
        """The codec of callback ``fid`` here: the one the name table records,
        else the one this process declared (None: raw bytes). ValueError if
        the two differ; PermissionError for pickle in a domain others can
        write."""
        dom = self._dom
        got = self._codecs.get(fid)
        if got is None:
            rc = lib.tw_name_codec(dom.d, fid)
            if rc == -errno.EUCLEAN:
                raise DomainCorruptError(f"domain {dom.name!r}: the codec recorded for callback "
                                         f"{self.func_name(fid)!r} is not one this build knows "
                                         "(scribbled)")
            got = _codec.CODEC_NAMES[rc] if rc > 0 else None
            if got is not None:
                self._codecs[fid] = got   # a recorded codec never changes
        declared = callbacks.codec_of(fid)
        if got is None:
            got = declared
        elif declared is not None and declared != got:
            raise ValueError(f"callback {self.func_name(fid)!r} is declared with codec "
                             f"{declared!r} in this process, but domain {dom.name!r} records "
                             f"codec {got!r} for it (the first declaration wins): declare the "
                             "same codec everywhere")
        if got == "pickle":
            self.refuse_pickle(self.func_name(fid))
        return got

    def encode_payload(self, fid: int, obj: Any) -> bytes:
        """A payload that is not bytes-like, encoded with the codec of
        callback ``fid`` (task._as_bytes); TypeError for a raw callback."""
        codec = self.codec(fid)
        if codec is None:
            raise TypeError(
                f"payload must be bytes-like, got {type(obj).__name__}: callback "
                f"{self.func_name(fid)!r} declares no codec in domain {self._dom.name!r}; "
                "declare one (@callback(..., codec=\"json\")) or encode the payload to bytes "
                "first (see shm_taskwork.codec)")
        return _codec.encode(codec, obj, f"payload for callback {self.func_name(fid)!r}")
