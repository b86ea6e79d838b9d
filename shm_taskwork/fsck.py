"""fsck: find what dead processes held, and with ``repair=True`` give it back.

A task process may die at any instruction. What it held is found through the
owner word of every pool node (free / allocated by process P / queued on,
cancelling on, detached by or running in task T / dead letter) and the task
and process tables, each entry carrying a pid plus the process's start time
so a reused pid is never mistaken for the registrant.

Repair, per dead task: put the exited sentinel in its head (adds now fail with
TaskExitedError), take its pi_lock once (a canceller inside finishes, or its
death is recovered), then give back every node it owned - pending works and
works it had detached but not started are *orphaned* (reported with their
callback names and payloads), works whose callback had started are
*interrupted* - and release the slot for a new registration. Per dead process:
nodes it allocated and never pushed, and a node it was popping from or pushing
to the free list when it died, are *leaked* and given back; a node it had
pushed but not yet marked queued (it died between the two) is *settled*: it is
a queued work like any other, and is left for its task to run. Live tasks and
live processes are never touched: every reclaim is a compare-and-swap on the
exact owner word that was judged dead.
"""
from __future__ import annotations

import dataclasses
import errno

from . import _native
from ._native import check, ffi, lib
from .work import Work

_LIVE_SLOT_STATES = (lib.TW_SLOT_RUNNING, lib.TW_SLOT_EXITING, lib.TW_SLOT_CLAIMING)
_GONE_SLOT_STATES = (lib.TW_SLOT_EXITED, lib.TW_SLOT_FREE)
_TASK_OWNED = (_native.N_QUEUED, _native.N_CANCELLING, _native.N_DETACHED)
_FSCK_AUX = 0xFFFFFF


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
    dead_processes: list[int] = dataclasses.field(default_factory=list)
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


def _alive(pid: int, start: int) -> bool:
    from .domain import _pid_running
    return pid > 0 and _native.start_ticks(pid) == start and _pid_running(pid)


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
    # 1. tasks whose process is gone (or whose pid now names another process)
    dead_slots: dict[int, int] = {}      # slot -> generation judged dead
    gone_slots: dict[int, int] = {}      # exited/free slot -> its generation
    for i in range(dom.max_tasks):
        s = dom._slot(i)
        st, gen = int(s.state), int(s.gen)
        if st in _LIVE_SLOT_STATES:
            if not _alive(int(s.pid), int(s.start_ticks)):
                dead_slots[i] = gen
                rep.dead_tasks.append(i)
        elif st in _GONE_SLOT_STATES:
            gone_slots[i] = gen
        else:
            rep.problems.append(f"task slot {i} has an unknown state {st}")

    # 2. processes of the process table that are gone
    dead_procs: dict[int, int] = {}      # proc index -> pid
    pid_p, start_p = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    for i in range(dom.max_procs):
        lib.tw_proc_info(d, i, pid_p, start_p)
        pid = int(pid_p[0])
        if pid and not _alive(pid, int(start_p[0])):
            dead_procs[i] = pid
            rep.dead_processes.append(pid)
    proc_dead = ffi.new("uint8_t[]", dom.max_procs)
    for i in dead_procs:
        proc_dead[i] = 1

    # 3. every node's owner word
    if repair:
        for slot, gen in dead_slots.items():
            rc = lib.tw_mark_exited(d, slot, gen)
            if rc < 0 and rc != -errno.ESRCH:
                rep.problems.append(f"task {slot}: could not mark it exited: "
                                    f"{_errname(rc)}")
    owners = ffi.new("uint64_t[]", dom.pool_size)
    lib.tw_scan_owners(d, owners)
    orphan_count: dict[int, int] = {}
    for node in range(dom.pool_size):
        o = int(owners[node])
        st, aux, gen = _native.owner_state(o), _native.owner_aux(o), _native.owner_gen(o)
        if st > _native.N_DEADLETTER:
            rep.problems.append(f"node {node} has an unknown owner state {st}")
            continue
        if st in _TASK_OWNED or st == _native.N_RUNNING:
            if aux >= dom.max_tasks:
                rep.problems.append(f"node {node} names task {aux}, beyond max_tasks={dom.max_tasks}")
                continue
            if aux in dead_slots:
                want_gen = dead_slots[aux]
            elif aux in gone_slots:
                want_gen = gone_slots[aux]
            else:
                continue
            w = dom._read(node, gen, "orphaned" if st != _native.N_RUNNING else "interrupted")
            if w is None or w.target_gen != want_gen:
                continue  # changed under us, or queued for a newer registration
            if repair and lib.tw_reclaim(d, node, o) != 1:
                continue  # its live owner (an adder whose push failed) took it back
            if st == _native.N_RUNNING:
                rep.interrupted += 1
                rep.interrupted_works.append(w)
            else:
                rep.orphaned += 1
                rep.orphaned_works.append(w)
                rep.orphaned_by_callback[w.func_name] = rep.orphaned_by_callback.get(w.func_name, 0) + 1
                orphan_count[aux] = orphan_count.get(aux, 0) + 1
        elif st == _native.N_ALLOC:
            if aux in dead_procs or (repair and aux == _FSCK_AUX):
                if not repair:
                    rep.leaked += 1   # or pushed just before its adder died
                    continue
                rc = lib.tw_fsck_settle(d, node, o)
                if rc == 1:
                    rep.leaked += 1
                elif rc == 2:
                    rep.settled += 1  # pushed: now an ordinary queued work
                elif rc == -errno.EAGAIN:
                    rep.incomplete.append(
                        f"node {node}: allocated by a dead process, but its target was "
                        "detaching; run fsck again")
                elif rc < 0:
                    rep.problems.append(f"node {node}: could not settle it: {_errname(rc)}")
            elif aux >= dom.max_procs and aux != _FSCK_AUX:
                rep.problems.append(f"node {node} names process entry {aux}, beyond "
                                    f"max_procs={dom.max_procs}")

    # 4. free nodes on no free list, left by a process that died mid pop/push
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

    if repair:
        for slot, cnt in orphan_count.items():
            lib.tw_slot_counter_add(d, slot, lib.TW_C_ORPHANED, cnt)
        for slot, gen in dead_slots.items():
            lib.tw_release_exited(d, slot, gen)
        for i, pid in dead_procs.items():
            lib.tw_proc_free(d, i, pid)
        hdr = ffi.cast("struct tw_header *", d.base)
        hdr.fsck_runs = (hdr.fsck_runs + 1) & 0xFFFFFFFFFFFFFFFF  # wraps, as in C


def _errname(rc: int) -> str:
    return errno.errorcode.get(-rc, str(rc))
