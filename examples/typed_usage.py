"""Every public call of shm_taskwork, in a program that `mypy --strict` checks.

`make test` runs `mypy --strict examples/typed_usage.py`: it must report
nothing, which is what a user's own strictly typed program gets from the
annotations and the ``py.typed`` marker. It also runs: a task in this process,
works added, cancelled and run, the kernel-style functions, dead letters,
asyncio, fsck; the domain is removed at the end.

    python examples/typed_usage.py
"""
from __future__ import annotations

import asyncio
import errno
import os
import signal

import shm_taskwork
from shm_taskwork import (TWA_FLAGS, TWA_NMI_CURRENT, TWA_NONE, TWA_RESUME, TWA_SIGNAL,
                          TWA_SIGNAL_NO_IPI, TWAF_NO_ALLOC, Domain, DomainCorruptError,
                          DomainStats, FsckReport, InvalidModeError, NoSuchTaskError,
                          NotCurrentTaskError, PayloadTooLargeError, PoolExhaustedError, Task,
                          TaskExitedError, TaskInfo, TaskWorkError, UnknownCallbackError, Work,
                          callback, init_task_work, task_work_add, task_work_cancel,
                          task_work_cancel_func, task_work_cancel_match, task_work_pending,
                          task_work_run)
from shm_taskwork import codec

seen: list[str] = []


@callback
def note(work: Work) -> None:
    seen.append(work.payload.decode())


@callback(name="typed.stop")
def stop_me(work: Work) -> None:
    os.kill(os.getpid(), signal.SIGHUP)


@callback(name="typed.flaky", retries=1, on_failure="dead_letter")
def flaky(work: Work) -> None:
    raise ValueError(f"attempt {work.attempt}")


@callback(name="typed.named")
def named(work: Work) -> None:
    seen.append(f"{work.func_name}:{work.sender_pid}:{work.enqueued_ns > 0}")


@callback(name="typed.async")
async def later(work: Work) -> None:
    await asyncio.sleep(0)
    seen.append("async " + work.payload.decode())


def matches(work: Work, data: object) -> bool:
    return work.payload == data


def main() -> int:
    name = f"typed_usage_{os.getpid()}"
    dom: Domain = Domain.create(name, max_tasks=4, pool_size=64, payload_size=64,
                                mode=0o600, record_origin=True)
    try:
        with Domain.open(name) as again, Domain.open_or_create(name, pool_size=64) as third:
            assert again.name == third.name == dom.name
            assert (dom.max_tasks, dom.pool_size, dom.payload_size) == (4, 64, 64)
        task: Task = dom.register("typed", signum=signal.SIGUSR1, install_handler=True,
                                  exit_signals=())
        assert dom.current is task and task.is_current
        assert dom.task(task.id) == dom.task(pid=task.pid) == dom.task(name=task.name)
        infos: list[TaskInfo] = dom.tasks()
        assert [t.name for t in dom.tasks("typed")] == ["typed"] and infos[0].state == "running"

        w: Work = task.add(note, b"one", TWA_RESUME)
        ws: list[Work] = task.add_many(note, [b"two", b"three"], TWA_NONE)
        assert w.state == "pending" and len(ws) == 2 and w.origin is not None
        assert task.cancel(ws[0]) and ws[0].state == "cancelled"
        task.add("typed.named", codec.json_dumps({"k": 1}), TWA_SIGNAL_NO_IPI | TWAF_NO_ALLOC)
        gone: Work | None = task.cancel_func("typed.named")
        assert gone is not None
        task.add(note, b"four", TWA_NONE)
        picked: Work | None = task.cancel_match(lambda x: x.payload == b"four")
        assert picked is not None and task.pending() == 2
        with task.critical():
            task.add(note, b"five", TWA_SIGNAL)
        ran: int = task.run(raise_errors=True)
        assert ran >= 0 and task.checkpoint() == 0
        task.add(note, b"six", TWA_NMI_CURRENT)
        assert task.wait(timeout=5) == 1 and task.fileno() >= 0

        k: Work = init_task_work(note, b"seven")
        assert task_work_add(task, k, TWA_NONE) == 0 and task_work_pending(task)
        assert task_work_cancel(task, k) and not task_work_pending(task)
        task_work_add(task, init_task_work(note, b"eight"), TWA_NONE)
        assert task_work_cancel_match(task, matches, b"eight") is not None
        task_work_add(task, init_task_work("typed.named"), TWA_NONE)
        assert task_work_cancel_func(task, "typed.named") is not None
        task_work_run()
        assert task_work_add(task, init_task_work(note), 0x7F) == -errno.EINVAL

        task.add("typed.unknown", b"", TWA_NONE)
        task.run()
        dead: list[Work] = dom.dead_letters(reason="unknown_callback")
        assert [d.reason for d in dead] == ["unknown_callback"] and dead[0].target_name == "typed"
        assert dom.retry_dead_letters(to=task) == 1
        task.run()
        assert dom.drop_dead_letters() == 1 and dom.run_dead_letters() == 0
        task.add(flaky, b"f", TWA_NONE)
        task.run()
        [failed] = dom.dead_letters(reason="failed")
        assert failed.attempt == 1 and failed.error == "ValueError: attempt 1"
        assert dom.drop_dead_letters(reason="failed") == 1 and task.adopt() == 0
        info: TaskInfo = dom.tasks("typed")[0]
        assert info.running == 0 and info.oldest_running_s is None

        async def aio() -> int:
            task.attach_loop()
            task.add(later, b"seven", TWA_RESUME)
            n = await task.wait_async(timeout=5)
            await asyncio.sleep(0.01)
            task.detach_loop()
            return n

        assert asyncio.run(aio()) == 1

        stats: DomainStats = dom.stats()
        report: FsckReport = dom.fsck(repair=False)
        assert report.clean and not report.dead_tasks and stats.pool_size == 64
        # serve() until a stop signal (here one a work sends), then drain:
        # the work queued behind it still runs, and the task exits
        task.add(note, b"drained", TWA_NONE)
        task.add(stop_me, b"", TWA_RESUME)
        served: int = task.serve(stop_signals=(signal.SIGHUP,), drain_timeout=1.0, adopt=False,
                                 watchdog=False)
        assert served == 2 and not task.is_current
        task.exit()
        try:
            task.add(note)
        except TaskExitedError as exc:
            assert exc.errno == errno.ESRCH
        assert TWA_FLAGS == 0xFF00 and shm_taskwork.__version__
        for e in (InvalidModeError, PayloadTooLargeError, PoolExhaustedError, NoSuchTaskError,
                  NotCurrentTaskError, DomainCorruptError, UnknownCallbackError):
            assert issubclass(e, TaskWorkError)
        assert codec.json_loads(codec.json_dumps([1])) == [1]
    finally:
        dom.close()
        dom.unlink()
    print(" ".join(seen))
    return 0


def keyed_and_remote(dom: Domain, redis_url: str | None = None) -> list[str]:
    """Keyed adds, and the bridge's client (docs/contract.md "Beyond one host: the bridge") when a Redis is given."""
    from shm_taskwork.keys import KeyRecord, lookup
    t = dom.current or dom.register("typed-keyed")
    rec: KeyRecord = t.add_keyed("typed.noop", b"", TWA_NONE, key="typed-key")
    again: KeyRecord | None = lookup(dom, "typed-key")
    out = [str(rec.fresh), str(again is not None and again.state)]
    if redis_url is not None:
        from shm_taskwork.remote import Cluster, RemoteWork
        with Cluster(redis_url) as cl:
            rt = cl.task("app", name="worker", node="host-b")
            w: RemoteWork = rt.add("app.reload", b"x", TWA_SIGNAL)
            ws: list[RemoteWork] = rt.add_many("app.reload", [b"a"])
            cancelled: bool = cl.cancel(ws[0])
            out += [str(cancelled), cl.outcome(w, timeout=1.0)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
