"""``shm-taskwork list | create | destroy | dead-letters | fsck``: find,
manage and repair domains.

``list`` finds every domain on this host (a segment in /dev/shm that starts
with the magic ``SHMTWRK\\x01``). ``create NAME`` makes a domain with the
given sizes, ``destroy NAME`` removes its name (processes that have it mapped
keep their mapping until they close it). ``dead-letters NAME`` lists the
domain's dead letters and re-queues (``--retry``) or drops (``--drop``) them.
``fsck NAME`` finds what dead processes held - tasks whose process is gone or
whose pid now names another process, their pending works, works they had
started, nodes a dead adder allocated and never queued - and with
``--repair`` gives it all back (README "Lifecycle without an operator").

Each ``main(argv, prog=..., command=...)`` returns the exit status. Errors are
raised as ``TaskWorkError`` / ``OSError`` / ``ValueError``; the dispatcher
turns them into one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FSCK_EPILOG = """\
exit status:
  0  the domain is clean, or everything fsck found was repaired (--repair)
  1  fsck found something it did not repair: dead tasks, orphaned or
     interrupted works or leaked nodes without --repair, or problems (an
     inconsistency fsck cannot repair) with or without it
  2  a usage error (a bad argument)
  3  nothing left unrepaired, but some checks could not be made because the
     domain was too busy at that moment ("incomplete"): run fsck again
  8  fsck could not check the domain: no such domain, permission denied, a
     corrupt header (one line on stderr, no report on stdout)

Dead letters are not fsck's to repair: they are works kept to act on
(`shm-taskwork dead-letters NAME`). fsck counts them and never calls a domain
"clean" while they hold pool nodes.

Without --repair fsck only reads the segment: it changes nothing and takes no
lock. With --repair it marks each dead task exited (adds to it then fail with
TaskExitedError), returns every node a dead process held to the pool, counts
the pending works of dead tasks as orphaned (by callback) and frees their
slots for new registrations. Live tasks are never touched; fsck may run while
other processes keep adding and running.
"""

DESTROY_EPILOG = """\
destroy refuses a segment that is not a task-work domain, and a domain that
still has live tasks registered (their pending works would be lost with it);
--force removes the name anyway. Processes that have the domain mapped keep
their mapping until they close it.
"""


LIST_EPILOG = """\
A domain is a segment in /dev/shm whose first bytes are the magic
SHMTWRK\\x01. One that cannot be opened (another layout version, a corrupt
header, no permission to map it) is listed as unreadable, with the reason.
Segments this user cannot read at all are counted under the table. Only
regular files are opened: a FIFO, socket or device there is skipped. Task
slots whose list lock another process held past the read's budget are
counted in the note ("N slots unreadable").
"""

DEAD_LETTERS_EPILOG = """\
reasons:
  unknown_callback  the task that ran it did not know its callback
  orphaned          its task died before running it (pending, or detached
                    but not started)
  interrupted       its callback had started when its task died: never
                    retried (it may have had effects)

Without --retry or --drop the dead letters are listed (newest first) and
nothing changes. --retry re-queues each one exactly once; one whose task has
no live successor of its name stays, is counted as left, and makes the exit
status 1; interrupted letters are never retried (they may have had effects).
"""

def _reasons() -> tuple[str, ...]:
    """The dead-letter reasons the package knows: its public list when it
    has one (new reasons appear with it), else the three every version has."""
    import shm_taskwork

    return tuple(getattr(shm_taskwork, "DEAD_LETTER_REASONS",
                         ("unknown_callback", "orphaned", "interrupted")))


DL_REASONS = _reasons()


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal permission mode: {text!r} "
                                         "(e.g. 0600 or 660)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is outside 0000..0777")
    return value


def _parser(prog: str, command: str) -> argparse.ArgumentParser:
    if command == "create":
        p = argparse.ArgumentParser(
            prog=prog, description="Create a task-work domain (a POSIX shared-memory "
            "segment). Fails if the name is taken.")
        p.add_argument("name", help="domain name (a leading '/' is added if missing)")
        p.add_argument("--max-tasks", type=_int, default=64, metavar="N",
                       help="task slots (default 64)")
        p.add_argument("--pool-size", type=_int, default=65536, metavar="N",
                       help="work nodes in the pool (default 65536)")
        p.add_argument("--payload-size", type=_int, default=224, metavar="N",
                       help="largest payload in bytes (default 224)")
        p.add_argument("--max-procs", type=_int, default=None, metavar="N",
                       help="processes that may add at once (default 4*max-tasks+64)")
        p.add_argument("--mode", type=_mode, default=0o600, metavar="MODE",
                       help="octal permission bits of the segment (default 0600)")
        p.add_argument("--record-origin", action="store_true",
                       help="record where each work was queued (file:line, pid)")
        p.add_argument("--json", action="store_true", help="print the new domain as JSON")
        return p
    if command == "destroy":
        p = argparse.ArgumentParser(
            prog=prog, description="Remove a task-work domain's name.", epilog=DESTROY_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", help="domain name")
        p.add_argument("--force", action="store_true",
                       help="remove it even if it is not a domain or has live tasks")
        p.add_argument("--json", action="store_true",
                       help='print one object: {"destroyed": NAME}')
        return p
    if command == "fsck":
        p = argparse.ArgumentParser(
            prog=prog, description="Find what dead processes held in a domain; with "
            "--repair, give it back.", epilog=FSCK_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", help="domain name")
        p.add_argument("--repair", action="store_true",
                       help="mark dead tasks exited and return what they held to the pool")
        p.add_argument("--json", action="store_true",
                       help="print one JSON object (the FsckReport fields) instead of text")
        return p
    if command == "list":
        p = argparse.ArgumentParser(
            prog=prog, description="Every task-work domain on this host: its size, tasks "
            "alive and dead, pending works and dead letters.", epilog=LIST_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--json", action="store_true", help="print one JSON list of objects")
        return p
    if command == "dead-letters":
        p = argparse.ArgumentParser(
            prog=prog, description="A domain's dead letters - works whose callback was "
            "unknown where they ran, works of tasks that died - listed, re-queued or "
            "dropped.", epilog=DEAD_LETTERS_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", help="domain name")
        act = p.add_mutually_exclusive_group()
        act.add_argument("--retry", action="store_true",
                         help="re-queue each one, exactly once, on a live task of its "
                              "original task's name (or on --to)")
        act.add_argument("--drop", action="store_true",
                         help="give their nodes back to the pool: the works are gone")
        p.add_argument("--to", metavar="TASK", default=None,
                       help="with --retry: the task to re-queue on (a name, an id, pid=N)")
        p.add_argument("--reason", choices=DL_REASONS, default=None,
                       help="only the dead letters of this reason")
        p.add_argument("--json", action="store_true",
                       help="print JSON: the list, or {\"retried\"|\"dropped\", \"left\"} "
                            "(--retry adds \"no_target\")")
        return p
    raise ValueError(f"tools.admin has no command {command!r}; it serves list, create, "
                     "destroy, dead-letters, fsck")


def main(argv: list[str] | None = None, *, prog: str | None = None,
         command: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if command is None:  # `python -m shm_taskwork.tools.admin COMMAND ...`
        if not argv or argv[0] not in ("create", "destroy", "fsck"):
            print("usage: python -m shm_taskwork.tools.admin {create,destroy,fsck} ...", file=sys.stderr)
            return 2
        command, argv = argv[0], argv[1:]
    prog = prog or f"shm-taskwork {command}"
    args = _parser(prog, command).parse_args(argv)
    return COMMANDS[command](args)


# ---- list -------------------------------------------------------------------

SHM_DIR = "/dev/shm"
MAGIC = b"SHMTWRK\x01"


def list_domains(shm_dir: str = SHM_DIR) -> tuple[list[dict], int]:
    """(one record per domain found, count of segments this user cannot read).

    Only regular files are opened, never blocking (``open_regular``): anyone
    may leave a FIFO in /dev/shm, and opening one for reading would wait for
    a writer for ever."""
    from shm_taskwork import Domain
    from shm_taskwork.tools._common import open_regular

    found, unreadable = [], 0
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError as exc:
        raise OSError(f"cannot list {shm_dir}: {exc.strerror or exc}") from None
    for n in names:
        path = os.path.join(shm_dir, n)
        try:
            fd = open_regular(path)
            if fd is None:
                continue    # a FIFO, a socket, a device, a link: not a domain
            try:
                if os.pread(fd, 8, 0) != MAGIC:
                    continue
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue  # gone meanwhile
        rec = {"name": "/" + n, "size": size, "error": None}
        try:
            with Domain.open(n) as dom:
                infos = dom.tasks(reap=False)   # only look: a dead task shows as dead
                st = dom.stats(infos=infos)
                rec.update(max_tasks=dom.max_tasks, pool_size=dom.pool_size,
                           payload_size=dom.payload_size,
                           alive=sum(1 for t in infos if t.state in ("running", "exiting")),
                           dead=sum(1 for t in infos if t.state == "dead"),
                           pending=st.pending, dead_letters=st.dead_letters,
                           pool_free=st.pool_free,
                           unreadable_slots=sum(1 for t in infos if t.unreadable))
        except FileNotFoundError:
            continue  # destroyed meanwhile
        except PermissionError:
            rec["error"] = "permission denied"
        except Exception as exc:  # an unreadable domain is shown as such, with why
            rec["error"] = _why_unreadable(path, exc)
        found.append(rec)
    return found, unreadable


def _why_unreadable(path: str, exc: Exception) -> str:
    """A short reason: the layout version when that is what differs."""
    from shm_taskwork import observe
    try:
        h = observe.segment_header(path[len("/dev/shm"):] if path.startswith("/dev/shm/")
                                   else path)
    except OSError:
        h = None
    version = h.layout_version if h is not None else None
    if version is not None and version != observe.LAYOUT_VERSION:
        return f"layout version {version} (this build reads {observe.LAYOUT_VERSION})"
    text = str(exc) or type(exc).__name__
    return text.split(";")[0]


def _list(args) -> int:
    from shm_taskwork.tools._common import fmt_bytes, plain_table, printable

    found, unreadable = list_domains()
    if args.json:
        print(json.dumps(found))
        return 0
    if not found:
        print("no task-work domains on this host")
    else:
        rows = []
        for r in found:
            name = printable(r["name"])   # a file name anyone may have chosen
            if r["error"]:
                rows.append((name, fmt_bytes(r["size"], compact=True), "-", "-", "-", "-",
                             "-", f"unreadable: {printable(r['error'])}"))
            else:
                k = r.get("unreadable_slots", 0)
                rows.append((name, fmt_bytes(r["size"], compact=True), r["alive"],
                             r["dead"], r["pending"], r["dead_letters"],
                             f"{r['pool_free']}/{r['pool_size']}",
                             f"{_plural(k, 'slot')} unreadable (list lock held)" if k else ""))
        plain_table(("domain", "size", "tasks", "dead", "pending", "dead letters",
                     "pool free", "note"), rows, sys.stdout,
                    right={"size", "tasks", "dead", "pending", "dead letters", "pool free"})
    if unreadable:
        print(f"{_plural(unreadable, 'segment')} in {SHM_DIR} could not be read "
              "(permission denied): run as their owner or as root to see them")
    return 0


# ---- dead letters -------------------------------------------------------------

def _retry_target(dom, key: str | None):
    """--to: an id or pid=N names one task; a name stays a name, so the
    domain picks a live task of it (the one with the fewest pending works)."""
    if key is None:
        return None
    if key.isdigit() or key.startswith("pid="):
        from shm_taskwork.tools.status import find_task
        return find_task(dom, key)
    return key.removeprefix("name=")


def _dead_letters(args) -> int:
    import time

    from shm_taskwork import Domain
    from shm_taskwork.tools._common import fmt_age, plain_table, preview, printable, work_id

    if args.to is not None and not args.retry:
        raise ValueError("--to goes with --retry")
    with Domain.open(args.name) as dom:
        if args.retry or args.drop:
            if args.retry:
                n = dom.retry_dead_letters(to=_retry_target(dom, args.to), reason=args.reason)
                verb = "retried"
            else:
                n = dom.drop_dead_letters(reason=args.reason)
                verb = "dropped"
            still = dom.dead_letters(reason=args.reason)
            left = len(still)
            # --retry never re-queues an interrupted letter (it may have had
            # effects): those stay by design; any other left had no live target
            stuck = sum(1 for w in still if w.reason != "interrupted") if args.retry else 0
            if args.json:
                out = {verb: n, "left": left}
                if args.retry:
                    out["no_target"] = stuck
                print(json.dumps(out))
            else:
                what = "dead letters" if args.reason is None else f"{args.reason} dead letters"
                why = []
                if stuck:
                    why.append(f"{stuck} with no live task to take them")
                if args.retry and left - stuck:
                    why.append(f"{left - stuck} interrupted, never retried")
                print(f"{printable(dom.name)}: {verb} {n} {what}; {left} left"
                      + (f" ({'; '.join(why)})" if why else ""))
            # exit 1: the operator asked for a retry and some letters could not go
            return 1 if stuck else 0
        works = dom.dead_letters(reason=args.reason)
        now = time.monotonic_ns()
        if args.json:
            out = []
            for w in works:
                rec = w.as_dict()
                rec["id"] = work_id(w.id)
                rec["reason"] = getattr(w, "reason", None)
                rec["target_name"] = getattr(w, "target_name", None)
                rec["age_ns"] = now - w.enqueued_ns if w.enqueued_ns else None
                out.append(rec)
            print(json.dumps(out))
            return 0
        if not works:
            print(f"{printable(dom.name)}: no dead letters"
                  + (f" of reason {args.reason}" if args.reason else ""))
            return 0
        print(f"{printable(dom.name)}: {_plural(len(works), 'dead letter')}"
              + (f" of reason {args.reason}" if args.reason else ""))
        rows = [(work_id(w.id), getattr(w, "reason", None) or "-", printable(w.func_name),
                 printable(getattr(w, "target_name", None) or "-"), w.target, w.sender_pid,
                 fmt_age(now - w.enqueued_ns, compact=True) if w.enqueued_ns else "-",
                 preview(w.payload, 16) or "-", f"{len(w.payload)}B") for w in works]
        plain_table(("work", "reason", "callback", "for task", "slot", "sender", "age",
                     "payload", "size"), rows, sys.stdout,
                    right={"slot", "sender", "age", "size"})
    return 0


# ---- create -----------------------------------------------------------------

def _create(args) -> int:
    from shm_taskwork import Domain

    opts = dict(max_tasks=args.max_tasks, pool_size=args.pool_size,
                payload_size=args.payload_size, mode=args.mode,
                record_origin=args.record_origin)
    if args.max_procs is not None:
        opts["max_procs"] = args.max_procs
    try:
        dom = Domain.create(args.name, **opts)
    except TypeError as exc:  # a size of the wrong type: said as a bad value
        raise ValueError(str(exc)) from None
    try:
        info = {"name": dom.name, "max_tasks": dom.max_tasks, "pool_size": dom.pool_size,
                "payload_size": dom.payload_size, "max_procs": dom.max_procs,
                "record_origin": dom.record_origin, "mode": f"{args.mode:04o}"}
    finally:
        dom.close()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"created {info['name']}: {info['max_tasks']} task slots, pool of "
              f"{info['pool_size']} works of up to {info['payload_size']} bytes, "
              f"{info['max_procs']} process entries, mode {info['mode']}"
              + (", origins recorded" if info["record_origin"] else ""))
    return 0


# ---- destroy ----------------------------------------------------------------

def _destroy(args) -> int:
    import posix_ipc

    from shm_taskwork import Domain, DomainCorruptError
    from shm_taskwork.domain import normalize_name

    name = normalize_name(args.name)
    if not args.force:
        try:
            dom = Domain.open(name)
        except DomainCorruptError as exc:
            raise DomainCorruptError(
                f"{exc}; not removing it (use --force to remove the name anyway)") from None
        try:
            live = [t for t in dom.tasks() if t.state in ("running", "exiting")]
        finally:
            dom.close()
        if live:
            who = ", ".join(f"task {t.id} (pid {t.pid})" for t in live)
            raise OSError(f"domain {name!r} still has live tasks: {who}; stop them first, "
                          "or use --force")
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        raise FileNotFoundError(f"no domain named {name!r}") from None
    if args.json:
        print(json.dumps({"destroyed": name}))
    else:
        print(f"destroyed {name}")
    return 0


# ---- fsck -------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fsck(args) -> int:
    from shm_taskwork import Domain

    with Domain.open(args.name) as dom:
        rep = dom.fsck(repair=args.repair)
        name = dom.name
        who = {t: _who(dom, t) for t in rep.dead_tasks}
        # read without a lock: the count the header keeps
        dead_letters = _dead_letter_count(dom)
    if args.json:
        out = rep.as_dict()
        out["dead_letters"] = dead_letters
        print(json.dumps(out, sort_keys=True))
    else:
        print(_render(name, rep, who, dead_letters))
    unrepaired = bool(rep.problems) or (not rep.repaired and not rep.clean)
    if unrepaired:
        return 1
    return 3 if rep.incomplete else 0


def _who(dom, slot: int) -> str:
    from shm_taskwork import observe
    from shm_taskwork.tools._common import printable
    name, pid = observe.slot_owner(dom, slot)
    return f"{printable(name)}, pid {pid}"


def _dead_letter_count(dom) -> int:
    from shm_taskwork import observe
    return observe.dead_letter_count(dom)


def _render(name: str, rep, who: dict, dead_letters: int) -> str:
    from shm_taskwork.tools._common import printable
    name = printable(name)
    found = not rep.clean
    if not found:
        # never "clean" while dead letters hold pool nodes
        head = ("nothing to repair, but " + _plural(dead_letters, "dead letter")
                + " hold" + ("s" if dead_letters == 1 else "") + " pool nodes"
                + f" (`shm-taskwork dead-letters {name}`)") if dead_letters else "clean"
    lines = [f"fsck {name}: " + (head if not found else "found " + ", ".join([
        _plural(len(rep.dead_tasks), "dead task"),
        _plural(rep.orphaned, "orphaned work"),
        _plural(rep.interrupted, "interrupted work"),
        _plural(rep.leaked, "leaked node"),
        _plural(rep.settled, "settled node"),
        _plural(len(rep.problems), "problem"),
    ]))]
    if rep.dead_tasks:
        lines.append("  dead tasks: " + "; ".join(f"{t} ({who[t]})" for t in rep.dead_tasks))
    if rep.dead_processes:
        lines.append("  dead processes (pid): " + ", ".join(str(p) for p in rep.dead_processes))
    if rep.orphaned_by_callback:
        lines.append("  orphaned by callback:")
        for cb, n in sorted(rep.orphaned_by_callback.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:>8}  {printable(cb)}")
    if rep.interrupted:
        lines.append(f"  interrupted (callback started, process died): {rep.interrupted}")
        for w in rep.interrupted_works[:10]:
            lines.append(f"    {printable(w.func_name)}  task {w.target}  id {w.id:#x}")
    if rep.leaked:
        lines.append(f"  leaked nodes (held by dead processes, in no list): {rep.leaked}")
    if rep.settled:
        lines.append(f"  settled (pushed by a process that died before marking it queued; "
                     f"left queued for its task): {rep.settled}")
    for p in rep.problems:
        lines.append(f"  problem: {printable(p)}")
    for p in rep.incomplete:
        lines.append(f"  incomplete: {p}")
    if dead_letters and found:
        lines.append(f"  dead letters: {dead_letters} hold pool nodes (works kept to act on: "
                     f"`shm-taskwork dead-letters {name}` lists, retries or drops them)")
    if found:
        if rep.repaired:
            lines.append("  repaired: yes" + (" (problems remain)" if rep.problems else ""))
        else:
            lines.append(f"  repaired: no (run `shm-taskwork fsck {name} --repair`)")
    return "\n".join(lines)


COMMANDS = {"list": _list, "create": _create, "destroy": _destroy,
            "dead-letters": _dead_letters, "fsck": _fsck}


if __name__ == "__main__":
    sys.exit(main())
