"""fsck: find what dead processes held, and with ``repair=True`` give it back.

Nobody has to run it (docs/contract.md "Lifecycle without an operator"): whoever notices a dead task reaps it, and a
process that needs a process-table entry reclaims a dead one's. fsck is the
same repair done on purpose, for everything at once, plus a consistency check
of the whole segment, and it is safe beside live processes in the middle of
any operation.

Death is read from the segment: a task or a process-table entry is dead when
the robust "life" lock it held shows FUTEX_OWNER_DIED (the kernel wrote it
when the holder died) - never judged by a pid, so a process that is still
starting, paused or slow is never taken for dead.

Repair, per dead task: reap it (``Domain._reap``): its list is closed (adds
fail with TaskExitedError), pending works and works it had detached but not
started become *orphaned* dead letters (reported with their callback names
and payloads), works whose callback had started are *interrupted* (reported,
given back, never run again). Per dead process: nodes it allocated and never
pushed, and a node it was popping from or pushing to the free list when it
died, are *leaked* and given back; a node it had pushed but not yet marked
queued is *settled*: it is a queued work like any other, left for its task.
Every reclaim is a compare-and-swap on the exact owner word judged dead.
Nodes in a dead process's node cache (CACHED in its entry) were free all
along: they go back to the free list with its entry and are no finding (an
entry that held only those counts as an idle dead entry).
"""
from __future__ import annotations

import collections
import dataclasses
import errno

from . import _native
from ._native import check, ffi, lib
from .work import Work

_TASK_OWNED = (_native.N_QUEUED, _native.N_CANCELLING, _native.N_DETACHED)


@dataclasses.dataclass
class FsckReport:
    dead_tasks: list[int] = dataclasses.field(default_factory=list)
    orphaned: int = 0
    orphaned_by_callback: dict[str, int] = dataclasses.field(default_factory=dict)
    interrupted: int = 0
    leaked: int = 0
    settled: int = 0
    repaired: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)
    # checks that could not be made now (the domain was too busy): not an
    # inconsistency; running fsck again completes them
    incomplete: list[str] = dataclasses.field(default_factory=list)
    # processes that died holding nodes (allocated, or mid free-list operation)
    dead_processes: list[int] = dataclasses.field(default_factory=list)
    # entries of processes that died holding nothing: free for the next
    # process that needs one (reclaimed by repair); not a finding
    idle_dead_entries: int = 0
    # works now on the dead-letter list (they hold pool nodes until retried
    # or dropped): not a fault, but worth an operator's look
    dead_letters: int = 0
    orphaned_works: list[Work] = dataclasses.field(default_factory=list)
    interrupted_works: list[Work] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.dead_tasks or self.orphaned or self.interrupted or self.leaked
                    or self.settled or self.problems or self.dead_processes)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["orphaned_works"] = [w.as_dict() for w in self.orphaned_works]
        d["interrupted_works"] = [w.as_dict() for w in self.interrupted_works]
        d["clean"] = self.clean
        return d


def fsck(dom, *, repair: bool = False) -> FsckReport:
    rep = FsckReport()
    d = dom.d
    if repair:
        check(lib.tw_fsck_lock(d), "fsck: another fsck holds the domain's fsck lock")
    try:
        _fsck(dom, d, rep, repair)
    finally:
        if repair:
            lib.tw_fsck_unlock(d)
    rep.repaired = repair
    return rep


def _fsck(dom, d, rep: FsckReport, repair: bool) -> None:
    # 1. dead tasks: reaped, or (dry run) what reaping would do
    dead_slots: dict[int, int] = {}
    for i in range(dom.max_tasks):
        st = int(dom._slot(i).state)
        if st not in _native.SLOT_STATES:
            rep.problems.append(f"task slot {i} has an unknown state {st}")
            continue
        if lib.tw_slot_dead(d, i) != 1:
            continue
        rep.dead_tasks.append(i)
        if not repair:
            dead_slots[i] = _native.owner_gen(int(dom._slot(i).head))  # the list's generation
            continue
        got = dom._reap(i)
        if got is None:
            if lib.tw_slot_dead(d, i) == 1 and int(dom._slot(i).state) != lib.TW_SLOT_EXITED:
                rep.incomplete.append(f"task {i}: dead, but being reaped by another process "
                                      "(or its locks were busy); run fsck again")
            continue
        rep.orphaned += got.orphaned_count
        rep.orphaned_works.extend(got.orphaned)
        for w in got.orphaned:
            rep.orphaned_by_callback[w.func_name] = rep.orphaned_by_callback.get(w.func_name, 0) + 1
        rep.interrupted += len(got.interrupted)
        rep.interrupted_works.extend(got.interrupted)

    # 2. dead processes of the process table: those that held something are
    #    findings; those that held nothing are entries waiting to be reused
    owners = ffi.new("uint64_t[]", dom.pool_size)
    lib.tw_scan_owners(d, owners)
    alloc_by = collections.Counter(_native.owner_aux(int(owners[k])) for k in range(dom.pool_size)
                                   if _native.owner_state(int(owners[k])) == _native.N_ALLOC)
    dead_procs: list[int] = []
    pid_p, start_p = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    info = ffi.new("struct tw_reap_info *")
    for i in range(dom.max_procs):
        if lib.tw_proc_dead(d, i) != 1:
            continue
        lib.tw_proc_info(d, i, pid_p, start_p)
        dead_procs.append(i)
        if alloc_by.get(i) or lib.tw_proc_busy(d, i) == 1:
            rep.dead_processes.append(int(pid_p[0]))
        else:
            rep.idle_dead_entries += 1
        if not repair:
            continue
        rc = lib.tw_proc_reclaim(d, i, 1, info)
        if rc == -errno.EAGAIN:
            rep.incomplete.append(f"process entry {i} (pid {int(pid_p[0])}): the free list "
                                  "never held still long enough to be checked; run fsck again")
        elif rc < 0:
            rep.problems.append(f"process entry {i}: could not reclaim it: {_errname(rc)}")
        else:
            rep.leaked += int(info.leaked)
            rep.settled += int(info.settled)
            rep.orphaned += int(info.refiled)

    # 3. every node's owner word: what a dry run would do, and what is odd
    if repair:
        lib.tw_scan_owners(d, owners)
    for node in range(dom.pool_size):
        o = int(owners[node])
        st, aux, gen = _native.owner_state(o), _native.owner_aux(o), _native.owner_gen(o)
        if st == lib.TW_N_CACHED:
            # free, in a process's node cache (counted free); a dead process's
            # cached nodes go back with its entry, and count as nothing lost
            if aux & ~lib.TW_CACHE_HELD >= dom.max_procs:
                rep.problems.append(f"node {node} names process entry "
                                    f"{aux & ~lib.TW_CACHE_HELD}, beyond max_procs={dom.max_procs}")
        elif st > _native.N_DONE:
            rep.problems.append(f"node {node} has an unknown owner state {st}")
        elif st == _native.N_DONE:
            if aux >= dom.max_tasks:
                rep.problems.append(f"node {node} names task {aux}, beyond max_tasks={dom.max_tasks}")
            # else: run; its runner (or the reaper of a dead one) frees it
        elif st in _TASK_OWNED or st == _native.N_RUNNING:
            if aux >= dom.max_tasks:
                rep.problems.append(f"node {node} names task {aux}, beyond max_tasks={dom.max_tasks}")
            elif aux in dead_slots:
                w = dom._read(node, gen, "interrupted" if st == _native.N_RUNNING else "orphaned")
                if w is None or w.target_gen != dead_slots[aux]:
                    continue
                if st == _native.N_RUNNING:
                    rep.interrupted += 1
                    rep.interrupted_works.append(w)
                else:
                    rep.orphaned += 1
                    rep.orphaned_works.append(w)
                    rep.orphaned_by_callback[w.func_name] = \
                        rep.orphaned_by_callback.get(w.func_name, 0) + 1
        elif st == _native.N_ALLOC and not repair and aux in dead_procs:
            rep.leaked += 1   # or pushed just before its adder died: repair tells
        elif st == _native.N_ALLOC and aux >= dom.max_procs and aux != 0xFFFFFF:
            rep.problems.append(f"node {node} names process entry {aux}, beyond "
                                f"max_procs={dom.max_procs}")

    # 4. free nodes on no free list that no live process is moving (left by
    #    a process that died mid pop/push and whose entry is not reclaimed)
    proc_dead = ffi.new("uint8_t[]", dom.max_procs)
    for i in dead_procs:
        proc_dead[i] = 1
    out = ffi.new("uint32_t[]", dom.pool_size)
    n = lib.tw_free_leaks(d, proc_dead, out, dom.pool_size, 64)
    if n == -errno.EAGAIN:
        rep.incomplete.append("the free list never held still long enough to be checked "
                              "(busy domain); run fsck again when it is quieter")
    elif n == -errno.EUCLEAN:
        rep.problems.append("the free list is corrupt (a link out of range or a cycle)")
    elif n > 0:
        for k in range(n):
            if repair:
                lib.tw_free_node(d, out[k])
        rep.leaked += n

    hdr = ffi.cast("struct tw_header *", d.base)
    rep.dead_letters = int(hdr.dl_count)
    if repair:
        hdr.fsck_runs = (hdr.fsck_runs + 1) & 0xFFFFFFFFFFFFFFFF  # wraps, as in C


def _errname(rc: int) -> str:
    return errno.errorcode.get(-rc, str(rc))
