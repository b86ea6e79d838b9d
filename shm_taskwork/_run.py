"""The run loop of a registration: the batch run path (README "Decisions
where the contract is silent", "The batch run path").

A run loads its detached works a chunk at a time (up to 1,024, or 1 MiB of
payload) with one native call (tw_run_load), runs their callbacks with no
native call per work, and frees the chunk with one native call
(tw_run_finish). Each work is started by one aligned 8-byte store into its
node's owner word (DETACHED -> RUNNING) and marked done by another
(RUNNING -> DONE): this module makes the only owner-word stores done from
Python, and owns the buffers they use. Elsewhere than x86 a native call
(tw_run_start) makes each start.

``RunLoop`` is a mixin of the registration (``registration.Registration``):
it uses the registration's ``_dom``, ``id``, ``gen``, ``_flagsp``,
``_head_at`` and, for async callbacks, ``_begin_async``/``_aio_took``.
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import sys
from itertools import islice
from typing import TYPE_CHECKING, Any

from . import _native, callbacks
from ._native import check, ffi, lib
from .callbacks import log_callback_error
from .work import Work

if TYPE_CHECKING:
    from .domain import Domain

log = logging.getLogger("shm_taskwork")

_mono = __import__("time").monotonic_ns
_new_work = object.__new__
# fault injection: SHM_TASKWORK_KILLPOINT=in_callback[:n] (read once)
_KP_IN_CALLBACK = lib.tw_killpoint_get() == lib.TW_KP_IN_CALLBACK
# the batch run path (see native/taskwork.h, tw_run_load)
_REC = lib.TW_REC_WORDS
_POFF, _OWNER_AT, _RUNNING = lib.TW_REC_POFF, lib.TW_REC_OWNER_AT, lib.TW_REC_RUNNING
_RUN_CHUNK = 1024
_NIL = lib.TW_NIL
_DONE_DELTA = lib.TW_DONE_DELTA
# chunks up to this size time each callback (two clock reads a work would cost
# more than the rest of the loop); larger ones count each the chunk's mean
_TIMED_CHUNK = 8
# A work is started by one aligned 8-byte store into its owner word: a release
# store on x86 (total store order). Elsewhere a native call makes it.
_STORE_STARTS = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class _Chunk:
    """What the run loop keeps of a loaded chunk: owner-word positions and
    RUNNING values, and the raw arrays (for node indices)."""

    __slots__ = ("k", "ats", "runs", "raw")

    def __init__(self, k: int, ats: list, runs: list, raw: bytes):
        self.k, self.ats, self.runs, self.raw = k, ats, runs, raw

    def node(self, i: int) -> int:
        return memoryview(self.raw).cast("Q")[lib.TW_REC_ID * self.k + i] & 0xFFFFFFFF


class _RunSource:
    """The lazy fields of the Works of one loaded run chunk: a copy of the
    chunk's id, func, enqueued and sender arrays (i: the work's index)."""

    __slots__ = ("domain", "target", "target_gen", "raw", "k", "origins", "dom", "d")

    def __init__(self, dom: "Domain", target: int, target_gen: int, raw: bytes, k: int,
                 origins: bytes | None):
        # built once per chunk (per work, for a round trip): plain stores only
        self.domain, self.target, self.target_gen = dom.name, target, target_gen
        self.raw, self.k, self.origins = raw, k, origins
        self.dom, self.d = dom, dom._d

    def lazy_fields(self, i: int) -> tuple:
        mv, k = memoryview(self.raw).cast("Q"), self.k
        fid = mv[lib.TW_REC_FUNC * k + i]
        sender = mv[lib.TW_REC_SENDER * k + i]
        pid, olen = sender & 0xFFFFFFFF, (sender >> 32) & 0xFFFF
        origin = None
        if olen and self.origins is not None:
            at = i * lib.TW_ORIGIN_LEN
            origin = self.origins[at:at + olen].decode(errors="replace")
        return (("func_name", callbacks.name_of(fid) or self.dom.func_name(fid)),
                ("func_id", fid),
                ("id", mv[lib.TW_REC_ID * k + i]),
                ("sender_pid", pid - (1 << 32) if pid >= 1 << 31 else pid),
                ("target", self.target), ("target_gen", self.target_gen),
                ("enqueued_ns", mv[lib.TW_REC_ENQ * k + i]), ("origin", origin),
                ("domain", self.domain), ("_state", "running"), ("reason", None),
                ("target_name", None),
                # the node is ours while its callback runs: its note is stable
                ("attempt", max(0, lib.tw_node_note(self.d, mv[lib.TW_REC_ID * k + i]
                                                    & 0xFFFFFFFF)) >> 16),
                ("error", None))


class RunLoop:
    """The chunk engine of a registration's run (see the module's doc)."""

    def _init_run_loop(self, dom: "Domain") -> None:
        """Allocate the buffers the run loop reuses for the registration's life."""
        self._unfinished: list[tuple[int, int]] = []   # (node, outcome) to finish again
        self._failed_now: list = []     # (index, exception, callback) of this chunk
        # a drain's deadline (CLOCK_MONOTONIC ns; 0: none): no work starts
        # after it, the run stops and leaves the rest detached (_halted)
        self._halt_at = 0
        self._halted = False
        self._failed_later: list = []   # failed works a lock timeout kept from filing
        self._out = ffi.new("uint32_t[]", dom.pool_size)
        self._bpos = self._bend = 0   # the detached batch: _out[_bpos:_bend], newest first
        self._sc = _native.Scratch(dom.payload_size)
        # records, payloads and origins of up to _chunk works per native call
        # (at most ~1 MiB of payload buffer)
        self._chunk = max(1, min(_RUN_CHUNK, (1 << 20) // max(1, dom.payload_size)))
        self._rec = ffi.new("uint64_t[]", self._chunk * lib.TW_REC_WORDS + 2)
        self._parea = ffi.new("char[]", self._chunk * max(1, dom.payload_size))
        self._oarea = (ffi.new("char[]", self._chunk * lib.TW_ORIGIN_LEN) if dom.record_origin
                       else ffi.NULL)
        self._outc = ffi.new("uint8_t[]", self._chunk)
        self._ends = ffi.new("uint64_t[]", self._chunk)
        # the segment as 64-bit words: the run loop's stores into owner words
        self._seg = memoryview(ffi.buffer(dom._d.base, dom._d.size & ~7)).cast("Q")
        self._flagsp = ffi.cast("uint32_t *", ffi.addressof(dom._slot(self.id), "flags"))
        slot_at = int(dom._d.slots_off) + self.id * ffi.sizeof("struct tw_slot")
        self._head_at = (slot_at + ffi.offsetof("struct tw_slot", "head")) // 8

    @property
    def _batch(self) -> int:
        """Works detached by a run and not started yet (left by an interrupted run)."""
        return self._bend - self._bpos

    def _detach(self) -> int:
        dom = self._dom
        if (self._seg[self._head_at] & 0xFFFFFFFF) == _NIL and not (
                self._flagsp[0] & lib.TW_F_EXITING):
            return 0  # an empty list (one load): no native call, as in tw_detach
        n = lib.tw_detach(dom.d, self.id, self.gen, self._out, dom.pool_size)
        if n == -errno.ESRCH:
            return 0
        check(n, "run")  # a lock timeout took nothing: the works wait for the next run
        self._bpos, self._bend = 0, n   # _out[0:n], newest first
        return n

    def _finish_unfinished(self) -> None:
        """Finish works whose end could not be recorded before (a dead-letter
        filing whose lock timed out): they stay ours until it succeeds."""
        dom, sc = self._dom, self._sc
        one = ffi.new("uint32_t[1]")
        while self._failed_later:
            node, _gen, exc, _fn = self._failed_later[-1]
            one[0] = node
            text = _error_text(exc)
            check(lib.tw_file_taken(dom.d, self.id, one, 1, lib.TW_R_FAILED, text, len(text),
                                    max(0, lib.tw_node_note(dom.d, node)) >> 16), "run")
            self._failed_later.pop()
        while self._unfinished:
            node, outcome = self._unfinished[-1]
            check(lib.tw_step(dom.d, self.id, node, outcome, lib.TW_NIL, sc.wi, sc.payload,
                              sc.origin), "run")
            self._unfinished.pop()

    def _run_batch(self, errs: list) -> int:
        """Run the detached batch, a chunk at a time: one native call loads a
        chunk (records, payloads), the loop below starts and runs each work
        with no native call (one store into the node's owner word makes it
        RUNNING: from then on it counts as started), one native call finishes
        the chunk (frees the nodes, counts, histograms)."""
        ran = 0
        dom = self._dom
        while self._bpos < self._bend and not self._halted:
            k = min(self._chunk, self._bend - self._bpos)
            nodes = self._out + self._bpos
            rc = lib.tw_run_load(dom.d, self.id, nodes, k, self._rec, self._parea, self._oarea,
                                 self._outc)
            check(rc, "run")
            ran += self._run_chunk(nodes, k, errs)
        return ran

    def _run_chunk(self, nodes: Any, k: int, errs: list) -> int:
        dom, rec = self._dom, self._rec
        if k == 1 and _STORE_STARTS and not _KP_IN_CALLBACK and not rec[_REC + 1]:
            # A batch of one untracked work (the round trip's case): the
            # plain loop's steps without the chunk's set-up.
            fn = callbacks._BY_ID.get(rec[lib.TW_REC_FUNC])
            if fn is not None and not fn.__shm_taskwork_batch__ and \
                    not fn.__shm_taskwork_async__:
                return self._run_single(fn, nodes, errs)
        # ids, funcs, enqueued, senders: kept as bytes for the lazy fields
        raw = ffi.buffer(rec, 8 * 4 * k)[:]
        fids = raw[8 * k:16 * k]
        homogeneous = k == 1 or fids == fids[:8] * k
        offs = ffi.unpack(rec + _POFF * k, k + 1)
        pl = ffi.buffer(self._parea, offs[k])[:]
        src = _RunSource(dom, self.id, self.gen, raw, k,
                         ffi.buffer(self._oarea, k * lib.TW_ORIGIN_LEN)[:] if self._oarea
                         else None)
        fid0 = int.from_bytes(fids[:8], sys.byteorder)
        fn = callbacks._BY_ID.get(fid0)
        # tracked works in the chunk (their outcome is settled per work, with
        # the callback's result): only the general loop does that
        tracked = rec[_REC * k + 1]
        if homogeneous and fn is not None and fn.__shm_taskwork_batch__:
            return self._run_whole_batch(fn, nodes, k, offs, pl, src, errs, tracked)
        chunk = _Chunk(k, ffi.unpack(rec + _OWNER_AT * k, k), ffi.unpack(rec + _RUNNING * k, k),
                       raw)
        trk = memoryview(raw).cast("Q")[lib.TW_REC_SENDER * k:(lib.TW_REC_SENDER + 1) * k] \
            if tracked else None
        if (homogeneous and fn is not None and not fn.__shm_taskwork_async__ and _STORE_STARTS
                and not _KP_IN_CALLBACK):
            return self._run_plain(fn, nodes, chunk, offs, pl, src, errs, trk)
        return self._run_mixed(nodes, chunk, memoryview(fids).cast("Q").tolist(), offs, pl,
                               src, errs, trk)

    def _run_plain(self, fn: Any, nodes: Any, c: "_Chunk", offs: list, pl: bytes,
                   src: "_RunSource", errs: list, trk: Any = None) -> int:
        """The common case: every work of the chunk is for one synchronous
        per-work callback. Per work: a light Work, one store (started), the
        call, one store (done). No native call, but one per tracked work
        (trk: the chunk's sender words, bit 62 tracked; None: none is): its
        outcome, with the callback's result, before its DONE store."""
        seg, ends = self._seg, self._ends
        k = c.k
        timed = k <= _TIMED_CHUNK
        new, mono = _new_work, _mono
        keep = fn.__shm_taskwork_keep__
        failed = self._failed_now = []
        started = done = -1     # works 0..started have started, 0..done returned
        try:
            for i, at, running, off, end in zip(range(k), c.ats, c.runs, offs,
                                                 islice(offs, 1, None)):
                if self._halt_at and mono() >= self._halt_at:
                    self._halted = True   # a drain's deadline: the rest stay detached
                    break
                w = new(Work)
                w.payload = pl[off:end]
                w._src = src
                w._i = i
                # DETACHED -> RUNNING: from this store on the work has started
                # (a reaper reports it interrupted, never runs it again)
                seg[at] = running
                started = i
                try:
                    ret = fn(w)
                except Exception as exc:
                    if self._raised(i, w, exc, fn, errs, failed, keep):
                        done = i
                        continue
                    if trk is not None and trk[i] >> 62:
                        self._settle(nodes[i], lib.TW_O_FAILED, _error_text(exc))
                else:
                    if trk is not None and trk[i] >> 62:
                        self._settle_result(nodes[i], ret)
                if timed:
                    ends[i] = mono()
                # RUNNING -> DONE: it ran; counted free from here on
                seg[at] = running + _DONE_DELTA
                done = i
        except BaseException:
            started = self._interrupted(c, started, done, set(), [])
            raise
        finally:
            self._end_chunk(nodes, c, started, set(), [], timed)
        return done + 1

    def _run_single(self, fn: Any, nodes: Any, errs: list) -> int:
        """_run_plain for a chunk of one untracked work, loaded in the
        record area: the same stores and the same ends, with no per-chunk
        copies, unpacks or loop set-up."""
        rec, seg = self._rec, self._seg
        at, running = rec[_OWNER_AT], rec[_RUNNING]
        raw = ffi.buffer(rec, 32)[:]
        off = rec[_POFF]
        w = _new_work(Work)
        w.payload = ffi.buffer(self._parea + off, rec[_POFF + 1] - off)[:]
        w._src = _RunSource(self._dom, self.id, self.gen, raw, 1,
                            ffi.buffer(self._oarea, lib.TW_ORIGIN_LEN)[:] if self._oarea
                            else None)
        w._i = 0
        keep = fn.__shm_taskwork_keep__
        failed = self._failed_now = []
        started = done = -1
        c = None        # the chunk's bookkeeping: built only off the common path
        try:
            if not (self._halt_at and _mono() >= self._halt_at):
                # DETACHED -> RUNNING: from this store on the work has started
                seg[at] = running
                started = 0
                try:
                    fn(w)
                except Exception as exc:
                    if self._raised(0, w, exc, fn, errs, failed, keep):
                        done = 0
                        return 1
                self._ends[0] = _mono()
                # RUNNING -> DONE: it ran; counted free from here on
                seg[at] = running + _DONE_DELTA
                done = 0
            else:
                self._halted = True   # a drain's deadline: it stays detached
        except BaseException:
            c = _Chunk(1, (at,), (running,), raw)
            started = self._interrupted(c, started, done, set(), [])
            raise
        finally:
            if done == 0 and not failed:
                # it ran and returned: _end_chunk's one native call, no more
                self._finish(nodes, 1, self._ends)
                self._bpos += 1
            else:
                self._end_chunk(nodes, c or _Chunk(1, (at,), (running,), raw), started, set(),
                                [], True)
        return done + 1

    def _finish(self, nodes: Any, n: int, ends: Any) -> None:
        """Free the first n nodes of a chunk (tw_run_finish: outcomes from
        _outc, end times from ends or none): a failure is logged, the nodes
        stay ours and fsck finds them."""
        rc = lib.tw_run_finish(self._dom.d, self.id, nodes, n, self._outc, ends)
        if rc < 0:
            log.error("task %d: finishing a run batch: %s", self.id, os.strerror(-rc))

    def _raised(self, i: int, w: Work, exc: Exception, fn: Any, errs: list, failed: list,
                keep: bool) -> bool:
        """Work i's per-work callback raised: log it and count it. With
        keep=True the work stays RUNNING (a reaper would report it
        interrupted) until _end_chunk retries it or files it "failed": True."""
        log_callback_error(w, exc)
        errs.append(exc)
        self._count_raised(1, keep)
        if keep:
            self._outc[i] = lib.TW_OUT_SKIP
            failed.append((i, exc, fn))
        return keep

    def _interrupted(self, c: "_Chunk", started: int, done: int, taken: set,
                     unknown: list) -> int:
        """After a BaseException (KeyboardInterrupt, SystemExit...) left the
        loop: the work in progress is finished as an error (as before); the
        rest stays for the next run. A work whose start was stored but not
        yet noted counts as started. Returns the last started index."""
        nxt = started + 1
        if nxt < c.k and nxt not in taken and self._seg[c.ats[nxt]] == c.runs[nxt]:
            started = nxt
        if done < started < c.k and started not in taken and started not in unknown:
            self._outc[started] = lib.TW_OUT_ERROR
            self._ends[started] = _mono()
        return started

    def _run_mixed(self, nodes: Any, c: "_Chunk", fids: list, offs: list, pl: bytes,
                   src: "_RunSource", errs: list, trk: Any = None) -> int:
        """Any chunk: several callbacks, unknown ones, async ones, batch
        callbacks among others, tracked works, a kill point, or no starting
        by stores. trk: the chunk's sender words (bit 62: tracked), or None."""
        dom = self._dom
        seg, outc, ends = self._seg, self._outc, self._ends
        k = c.k
        timed = k <= _TIMED_CHUNK
        by_id = callbacks._BY_ID
        mono = _mono
        ran = 0
        failed = self._failed_now = []
        started = done = -1
        taken: set[int] = set()  # started out of order: a batch callback's works
        unknown: list[int] = []
        try:
            for i in range(k):
                if i in taken:
                    continue
                if self._halt_at and mono() >= self._halt_at:
                    self._halted = True   # a drain's deadline: the rest stay detached
                    break
                fid = fids[i]
                fn = by_id.get(fid)
                if fn is not None and fn.__shm_taskwork_batch__:
                    ran += self._run_batch_callback(fn, fid, i, c, fids, offs, pl, src, taken,
                                                    errs, timed)
                    started = done = i
                    continue
                w = _new_work(Work)
                w.payload = pl[offs[i]:offs[i + 1]]
                w._src = src
                w._i = i
                at, running = c.ats[i], c.runs[i]
                if _STORE_STARTS:
                    seg[at] = running
                else:
                    check(lib.tw_run_start(dom.d, self.id, nodes[i]), "run")
                started = i
                if fn is None:
                    outc[i] = lib.TW_OUT_UNKNOWN
                    unknown.append(i)
                    w._state = "dead-letter"
                    log.warning("work %#x for unknown callback %s kept as a dead letter",
                                w.id, w.func_name)
                    done = i
                    continue
                if _KP_IN_CALLBACK:
                    lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
                if fn.__shm_taskwork_async__:
                    node = nodes[i]
                    ran += self._begin_async(w, fn, node, errs)
                    outc[i] = lib.TW_OUT_SKIP if self._aio_took(node) else lib.TW_OUT_ERROR
                    ends[i] = mono()
                    done = i
                    continue
                try:
                    ret = fn(w)
                except Exception as exc:
                    if self._raised(i, w, exc, fn, errs, failed, fn.__shm_taskwork_keep__):
                        done = i      # retried or filed in _end_chunk
                        ran += 1
                        continue
                    if trk is not None and trk[i] >> 62:
                        self._settle(nodes[i], lib.TW_O_FAILED, _error_text(exc))
                else:
                    if trk is not None and trk[i] >> 62:
                        self._settle_result(nodes[i], ret)
                if timed:
                    ends[i] = mono()
                if _STORE_STARTS:
                    seg[at] = running + _DONE_DELTA
                done = i
                ran += 1
        except BaseException:
            started = self._interrupted(c, started, done, taken, unknown)
            raise
        finally:
            self._end_chunk(nodes, c, started, taken, unknown, timed)
        return ran

    def _run_whole_batch(self, fn: Any, nodes: Any, k: int, offs: list, pl: bytes,
                         src: "_RunSource", errs: list, tracked: int = 0) -> int:
        """The whole chunk is one batch callback's (its common case): its
        works are started by one native call, the callback is called once,
        and tw_run_finish frees them right after."""
        outc = self._outc
        new = _new_work
        works = []
        append = works.append
        for i, off, end in zip(range(k), offs, islice(offs, 1, None)):
            w = new(Work)
            w.payload = pl[off:end]
            w._src = src
            w._i = i
            append(w)
        if self._halt_at and _mono() >= self._halt_at:
            self._halted = True   # a drain's deadline: the chunk stays detached
            return 0
        check(lib.tw_run_start_many(self._dom.d, self.id, nodes, k), "run")
        try:
            if _KP_IN_CALLBACK:
                lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
            failed: list = []
            try:
                fn(works)
            except Exception as exc:
                # one error per work of the list
                log_callback_error(works[0], exc)
                errs.extend([exc] * k)
                self._count_raised(k, fn.__shm_taskwork_keep__)
                if fn.__shm_taskwork_keep__:
                    ffi.memmove(outc, bytes([lib.TW_OUT_SKIP]) * k, k)
                    failed = [(i, exc, fn) for i in range(k)]
                elif tracked:   # (untracked ones: tw_settle says 0)
                    text = _error_text(exc)
                    for i in range(k):
                        self._settle(nodes[i], lib.TW_O_FAILED, text)
            except BaseException:
                ffi.memmove(outc, bytes([lib.TW_OUT_ERROR]) * k, k)
                raise
        finally:
            self._finish(nodes, k, ffi.NULL)
            self._bpos += k
        if failed:
            self._settle_failed(nodes, src, failed)
        return k

    def _run_batch_callback(self, fn: Any, fid: int, i: int, c: "_Chunk", fids: list,
                            offs: list, pl: bytes, src: "_RunSource", taken: set, errs: list,
                            timed: bool) -> int:
        """A batch callback in a mixed chunk: its works of this chunk (i and
        later), newest first, all started, then one call."""
        seg, outc, ends = self._seg, self._outc, self._ends
        works = []
        idx = []
        for j in range(i, c.k):
            if fids[j] != fid or j in taken:
                continue
            w = _new_work(Work)
            w.payload = pl[offs[j]:offs[j + 1]]
            w._src = src
            w._i = j
            works.append(w)
            idx.append(j)
        for j in idx:
            if _STORE_STARTS:
                seg[c.ats[j]] = c.runs[j]
            else:
                check(lib.tw_run_start(self._dom.d, self.id, c.node(j)), "run")
            taken.add(j)
        if _KP_IN_CALLBACK:
            lib.tw_killpoint(lib.TW_KP_IN_CALLBACK)
        try:
            fn(works)
        except Exception as exc:
            log_callback_error(works[0], exc)
            errs.extend([exc] * len(idx))
            self._count_raised(len(idx), fn.__shm_taskwork_keep__)
            if fn.__shm_taskwork_keep__:
                for j in idx:   # retried or filed in _end_chunk
                    outc[j] = lib.TW_OUT_SKIP
                    self._failed_now.append((j, exc, fn))
                return len(idx)
        except BaseException:
            now = _mono()
            for j in idx:
                outc[j] = lib.TW_OUT_ERROR
                ends[j] = now
            raise
        now = _mono() if timed else 0
        for j in idx:
            if timed:
                ends[j] = now
            if _STORE_STARTS:
                seg[c.ats[j]] = c.runs[j] + _DONE_DELTA
        return len(idx)

    def _settle(self, node: int, outcome: int, data: "bytes | None") -> None:
        """Record the outcome of a tracked RUNNING work of ours, before its
        DONE store (docs/contract.md "Outcomes"); data: result or error."""
        rc = lib.tw_settle(self._dom.d, self.id, node, outcome,
                           ffi.NULL if data is None else data, 0 if data is None else len(data))
        if rc < 0:
            log.error("task %d: recording the outcome of the work at node %d: %s", self.id,
                      node, os.strerror(-rc))

    def _settle_result(self, node: int, ret: Any) -> None:
        """A tracked work's callback returned ret: ran, with ret as its
        result if it is bytes; bytes larger than payload_size cannot be
        delivered, so the outcome is failed (as a future whose result cannot
        be sent back)."""
        if ret.__class__ is not bytes:
            ret = bytes(ret) if isinstance(ret, (bytearray, memoryview)) else None
        if ret is not None and len(ret) > self._dom.payload_size:
            self._settle(node, lib.TW_O_FAILED,
                         f"ValueError: the callback returned {len(ret)} bytes, more than "
                         f"payload_size={self._dom.payload_size}".encode())
            return
        self._settle(node, lib.TW_O_RAN, ret)

    def _count_raised(self, n: int, kept: bool) -> None:
        """Count n raises now, not when the chunk ends, so that ``errors`` is
        current during a long batch (the outcome stays OK: tw_run_finish
        counts the run). A kept work (retried or filed) is counted run here
        too, as tw_run_finish skips it."""
        d, slot = self._dom.d, self.id
        lib.tw_slot_counter_add(d, slot, lib.TW_C_ERRORS, n)
        if kept:
            lib.tw_slot_counter_add(d, slot, lib.TW_C_RUN, n)

    def _settle_failed(self, nodes: Any, chunk: Any, failed: list) -> None:
        """Works whose callback raised, still RUNNING and ours: each is
        queued again on this task while it has retries left (Work.attempt
        counts them), else filed as a "failed" dead letter keeping its error
        (README "Workers in production"). Counted when they raised."""
        dom = self._dom
        d, slot = dom.d, self.id
        ids = memoryview(chunk.raw).cast("Q")
        base = lib.TW_REC_ID * chunk.k
        one = ffi.new("uint32_t[1]")
        for i, exc, fn in failed:
            node = nodes[i]
            one[0] = node
            attempt = max(0, lib.tw_node_note(d, node)) >> 16
            if attempt < fn.__shm_taskwork_retries__:
                rc = lib.tw_file_taken(d, slot, one, 1, lib.TW_R_FAILED, ffi.NULL, 0,
                                       attempt + 1)
                if rc == 1:
                    # the letter goes straight back onto this task's list
                    rc = lib.tw_requeue(d, node, ids[base + i] >> 32, slot, self.gen,
                                        lib.TW_TWA_NONE, -1, -1, 0, _mono(),
                                        1 | lib.TW_ADD_RETRY)
                    if rc < 0:
                        log.error("task %d: work at node %d could not be queued again (%s); "
                                  "it stays a failed dead letter", slot, node,
                                  os.strerror(-rc))
                    continue
            else:
                text = _error_text(exc)
                rc = lib.tw_file_taken(d, slot, one, 1, lib.TW_R_FAILED, text, len(text),
                                       attempt)
                if rc == 1:
                    continue
            if rc < 0:
                log.error("task %d: work at node %d failed and could not be filed (%s); it "
                          "is reported interrupted if this process dies before the next "
                          "try", slot, node, os.strerror(-rc))
                self._failed_later.append((node, ids[base + i] >> 32, exc, fn))

    def _end_chunk(self, nodes: Any, c: "_Chunk", started: int, taken: set, unknown: list,
                   timed: bool) -> None:
        """Finish the started works of a chunk (0..started, and those taken
        by batch callbacks); keep the others, detached, for the next run."""
        dom, outc, ends, k = self._dom, self._outc, self._ends, c.k
        hi = max(started, max(taken) if taken else -1) + 1
        left = [j for j in range(started + 1, k) if j not in taken]
        for j in left:
            if j < hi:
                outc[j] = lib.TW_OUT_SKIP   # not started: not finished here
        self._finish(nodes, hi, ends if timed else ffi.NULL)
        failed, self._failed_now = self._failed_now, []
        if failed:
            self._settle_failed(nodes, c, failed)
        for j in unknown:
            node = c.node(j)
            sc = self._sc
            rc = lib.tw_step(dom.d, self.id, node, lib.TW_OUT_UNKNOWN, lib.TW_NIL, sc.wi,
                             ffi.NULL, ffi.NULL)
            if rc < 0:
                self._unfinished.append((node, lib.TW_OUT_UNKNOWN))
                log.error("task %d: could not finish work at node %d (%s); it is finished "
                          "at the next run", self.id, node, os.strerror(-rc))
        # The works not started stay detached, newest first, for the next run.
        if left:
            keep = [c.node(j) for j in left]
            base = self._bpos + k - len(keep)
            for n_, node in enumerate(keep):
                self._out[base + n_] = node
            self._bpos = base
        else:
            self._bpos += k


def _error_text(exc: BaseException) -> bytes:
    """How an outcome records an exception: "Type: message"."""
    return f"{type(exc).__name__}: {exc}".encode(errors="replace")
