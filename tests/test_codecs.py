"""Codecs (docs/contract.md "Codecs"): a callback declares how its payload
holds an object, the domain's name table records it with the name, a sender
that knows only the name encodes with it, and the callback reads
``work.value``. Real processes and real segments throughout."""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from conftest import readline
from shm_taskwork import callback, codec
from shm_taskwork._native import ffi, lib
from shm_taskwork.callbacks import func_id, unregister
from shm_taskwork.constants import TWA_NONE
from shm_taskwork.errors import DomainCorruptError, PayloadTooLargeError
from shm_taskwork.work import Work

try:
    import msgpack  # noqa: F401  (optional: the msgpack extra)
    HAVE_MSGPACK = True
except ImportError:
    HAVE_MSGPACK = False


@pytest.fixture
def declared():
    """Declare callbacks for one test; forgotten in this process afterwards."""
    names: list[str] = []

    def declare(name: str, codec: str | None = None, fn=None):
        seen: list = []

        def cb(work):
            seen.append(work)

        callback(fn or cb, name=name, codec=codec)
        names.append(name)
        return seen

    yield declare
    for name in names:
        unregister(name)


def codec_recorded(dom, name: str) -> int:
    return lib.tw_name_codec(dom.d, func_id(name))


# ---- a declaring runner and a sender that knows only the name ----------------------

# Declares app.reload with argv[3] as its codec (before or after it opens the
# domain, as argv[4] says), registers, prints its task id, and on each "run"
# line runs its list and prints one JSON line: what each work read, newest first.
RUNNER = """
    import json, sys
    from shm_taskwork import Domain, callback
    seen = []

    def declare():
        @callback(name="app.reload", codec=None if sys.argv[3] == "raw" else sys.argv[3])
        def reload(work):
            try:
                seen.append({"value": work.value, "payload": work.payload.hex()})
            except Exception as exc:
                seen.append({"error": type(exc).__name__, "message": str(exc)})

    if sys.argv[4] == "first":
        declare()
    dom = Domain.open(sys.argv[1])
    if sys.argv[4] != "first":
        declare()
    task = dom.register(sys.argv[2])
    print(task.id, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        seen.clear()
        print(json.dumps({"ran": task.run(), "works": seen}, default=repr), flush=True)
    task.exit()
"""

# Knows only the name: opens the domain, adds argv[3] (JSON) to task argv[2]
# by the callback's name, prints "ok" or the error it got.
SENDER = """
    import json, sys
    from shm_taskwork import Domain
    from shm_taskwork.constants import TWA_NONE
    dom = Domain.open(sys.argv[1])
    try:
        dom.task(int(sys.argv[2])).add("app.reload", json.loads(sys.argv[3]), TWA_NONE)
        print("ok", flush=True)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
    dom.close()
"""


def start_runner(spawn, dom, codec_name: str, when: str = "first"):
    child = spawn(RUNNER, dom.name, "runner", codec_name, when, stdin=subprocess.PIPE)
    return child, int(readline(child))


def run_once(child) -> list[dict]:
    """What each work of one run read in the runner, newest first."""
    child.stdin.write("run\n")
    child.stdin.flush()
    got = json.loads(readline(child))
    assert got["ran"] == len(got["works"])
    return got["works"]


def send(spawn, dom, task_id: int, obj) -> str:
    child = spawn(SENDER, dom.name, str(task_id), json.dumps(obj))
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    return out.strip()


@pytest.mark.parametrize("when", ["first", "after_open"])
def test_a_sender_that_knows_only_the_name_encodes_with_the_declared_codec(make_domain, spawn,
                                                                          when):
    dom = make_domain("codec")
    runner, task_id = start_runner(spawn, dom, "json", when)
    assert codec_recorded(dom, "app.reload") == lib.TW_CODEC_JSON
    assert send(spawn, dom, task_id, {"path": "a.toml"}) == "ok"
    assert run_once(runner) == [{"value": {"path": "a.toml"},
                                 "payload": b'{"path":"a.toml"}'.hex()}]
    assert dom.pool_free() == dom.pool_size


def test_a_name_without_a_codec_refuses_an_object_and_queues_nothing(make_domain, spawn):
    dom = make_domain("raw")
    runner, task_id = start_runner(spawn, dom, "raw")
    assert codec_recorded(dom, "app.reload") in (lib.TW_CODEC_RAW, -errno.ENOENT)
    out = send(spawn, dom, task_id, {"path": "a.toml"})
    assert out.startswith("TypeError") and "bytes-like" in out and "declare" in out \
        and "codec" in out, out
    assert dom.pool_free() == dom.pool_size


def test_the_first_declaration_wins_and_a_conflicting_one_fails_where_it_puts_the_name(
        make_domain, spawn):
    dom = make_domain("conflict")
    runner, task_id = start_runner(spawn, dom, "json")
    other = spawn("""
        import sys
        from shm_taskwork import Domain, callback
        from shm_taskwork.constants import TWA_NONE

        @callback(name="app.reload", codec="pickle")
        def reload(work):
            pass

        dom = Domain.open(sys.argv[1])   # records nothing: json was first
        task = dom.task(int(sys.argv[2]))
        for payload in (b"raw", {"a": 1}):
            try:
                task.add(reload, payload, TWA_NONE)
                print("queued", flush=True)
            except ValueError as exc:
                print("ValueError", exc, flush=True)
    """, dom.name, str(task_id))
    out, err = other.communicate(timeout=30)
    assert other.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("ValueError") for line in lines), out
    assert "'pickle'" in lines[0] and "'json'" in lines[0] and "first" in lines[0]
    assert codec_recorded(dom, "app.reload") == lib.TW_CODEC_JSON
    assert dom.pool_free() == dom.pool_size
    # the runner still reads what a name-only sender encodes with the first codec
    assert send(spawn, dom, task_id, [1, "two"]) == "ok"
    assert [w["value"] for w in run_once(runner)] == [[1, "two"]]


# ---- the native record -----------------------------------------------------------------

def test_the_native_codec_record_is_set_once(domain):
    fid = func_id("native.codec")
    assert lib.tw_name_codec(domain.d, fid) == -errno.ENOENT
    assert lib.tw_name_set_codec(domain.d, fid, lib.TW_CODEC_JSON) == -errno.ENOENT
    assert lib.tw_name_put(domain.d, fid, b"native.codec", 12) == 0
    assert lib.tw_name_codec(domain.d, fid) == lib.TW_CODEC_RAW
    for bad in (lib.TW_CODEC_RAW, lib.TW_CODEC_MAX + 1, 0xFFFFFFFF):
        assert lib.tw_name_set_codec(domain.d, fid, bad) == -errno.EINVAL
    assert lib.tw_name_set_codec(domain.d, 0, lib.TW_CODEC_JSON) == -errno.EINVAL
    assert lib.tw_name_set_codec(domain.d, fid, lib.TW_CODEC_MSGPACK) == lib.TW_CODEC_MSGPACK
    assert lib.tw_name_set_codec(domain.d, fid, lib.TW_CODEC_MSGPACK) == lib.TW_CODEC_MSGPACK
    # a later, different declaration does not replace the first
    assert lib.tw_name_set_codec(domain.d, fid, lib.TW_CODEC_JSON) == lib.TW_CODEC_MSGPACK
    assert lib.tw_name_codec(domain.d, fid) == lib.TW_CODEC_MSGPACK


def test_the_codec_numbers_are_the_layouts():
    assert codec.CODEC_IDS == {"json": lib.TW_CODEC_JSON, "pickle": lib.TW_CODEC_PICKLE,
                               "msgpack": lib.TW_CODEC_MSGPACK}
    assert max(codec.CODEC_IDS.values()) == lib.TW_CODEC_MAX


def _name_entry(dom, fid: int):
    """The name-table entry of ``fid`` (open addressing on the id)."""
    d = dom.d
    size = ffi.sizeof("struct tw_name")
    for k in range(d.names_cap):
        e = ffi.cast("struct tw_name *", d.base + d.names_off + ((fid + k) % d.names_cap) * size)
        if e.id == fid:
            return e
    raise AssertionError("name not found")


def test_a_scribbled_codec_is_reported_not_used(domain, declared):
    declared("scribbled.codec", "json")
    task = domain.register("w")
    task.add("scribbled.codec", {"a": 1}, TWA_NONE)
    assert task.run() == 1
    e = _name_entry(domain, func_id("scribbled.codec"))
    e.codec = 99
    assert lib.tw_name_codec(domain.d, func_id("scribbled.codec")) == -errno.EUCLEAN
    fresh = type(domain).open(domain.name)   # nothing cached
    try:
        with pytest.raises(DomainCorruptError, match="scribbled"):
            fresh.task(task.id).add("scribbled.codec", {"a": 1}, TWA_NONE)
    finally:
        fresh.close()
    assert domain.pool_free() == domain.pool_size


# ---- choosing a codec ------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["yaml", "JSON", "", 1, b"json", True])
def test_an_invalid_codec_names_the_valid_choices(bad):
    with pytest.raises(ValueError) as info:
        callback(lambda w: None, name="bad.codec", codec=bad)
    text = str(info.value)
    assert "None" in text and "'json'" in text and "'pickle'" in text and repr(bad) in text


def test_msgpack_without_the_package_is_a_clear_error(spawn):
    child = spawn("""
        import sys
        sys.modules["msgpack"] = None   # as if it were not installed
        from shm_taskwork import callback
        try:
            callback(lambda w: None, name="mp", codec="msgpack")
            print("declared")
        except ValueError as exc:
            print(exc)
    """)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "msgpack package" in out and "'json'" in out and "'pickle'" in out, out
    assert "'msgpack'" in out and "valid codecs here" in out


@pytest.mark.skipif(not HAVE_MSGPACK, reason="msgpack is not installed (the msgpack extra)")
def test_msgpack_round_trips_through_a_run(domain, declared):
    seen = declared("app.mp", "msgpack")
    task = domain.register("w")
    obj = {"b": b"\x00\xff", "n": [1, 2.5, None], "s": "ü"}
    w = task.add("app.mp", obj, TWA_NONE)
    assert w.payload == msgpack.packb(obj, use_bin_type=True)
    assert task.run() == 1
    assert seen[0].value == obj
    assert codec_recorded(domain, "app.mp") == lib.TW_CODEC_MSGPACK


def test_json_and_pickle_round_trip_and_bytes_stay_as_they_are(domain, declared):
    seen_json = declared("app.json", "json")
    seen_pickle = declared("app.pickle", "pickle")
    task = domain.register("w")
    task.add("app.json", "text", TWA_NONE)                     # a str is an object too
    task.add("app.json", bytearray(b'{"k":[1]}'), TWA_NONE)     # bytes-like: not encoded
    task.add("app.pickle", {1, 2, frozenset({3})}, TWA_NONE)
    assert task.run() == 3
    assert [w.payload for w in seen_json] == [b'{"k":[1]}', b'"text"']   # newest first
    assert [w.value for w in seen_json] == [{"k": [1]}, "text"]
    assert seen_pickle[0].value == {1, 2, frozenset({3})}
    assert codec_recorded(domain, "app.pickle") == lib.TW_CODEC_PICKLE


# ---- raw callbacks: unchanged -------------------------------------------------------------

def test_a_raw_callback_keeps_bytes_and_its_value_is_the_payload(domain, declared):
    seen = declared("app.raw")
    task = domain.register("w")
    w = task.add("app.raw", b"\x00abc", TWA_NONE)
    assert w.payload == b"\x00abc" and w.value == b"\x00abc"
    task.add("app.raw", memoryview(b"mv"), TWA_NONE)
    assert task.run() == 2
    assert [x.value for x in seen] == [b"mv", b"\x00abc"]
    assert codec_recorded(domain, "app.raw") == lib.TW_CODEC_RAW
    free = domain.pool_free()
    for obj in ({"a": 1}, 5, "text"):
        with pytest.raises(TypeError, match="bytes-like.*declares no codec.*codec="):
            task.add("app.raw", obj, TWA_NONE)
    assert domain.pool_free() == free


def test_a_payload_that_is_not_valid_in_its_codec_is_a_clear_error_on_read(domain, declared):
    seen = declared("app.strict", "json")
    task = domain.register("w")
    task.add("app.strict", b"\xffnot json", TWA_NONE)    # bytes are trusted to be encoded
    assert task.run() == 1
    with pytest.raises(ValueError, match="not valid json"):
        seen[0].value
    assert seen[0].payload == b"\xffnot json"


def test_a_work_whose_domain_is_not_open_here_uses_this_process_declaration(declared):
    declared("app.away", "json")
    w = Work("app.away", func_id("app.away"), b"[1]", domain="/tw_test_not_open_here")
    assert w.value == [1]
    declared("app.away.pickle", "pickle")
    w = Work("app.away.pickle", func_id("app.away.pickle"), b"", domain="/tw_test_not_open")
    with pytest.raises(PermissionError, match="not open in this process"):
        w.value


# ---- encode errors: nothing queued ------------------------------------------------------

def test_a_payload_the_codec_cannot_encode_queues_nothing(make_domain, declared):
    dom = make_domain("enc", payload_size=64)
    declared("app.enc", "json")
    declared("app.enc.pickle", "pickle")
    task = dom.register("w")
    free = dom.pool_free()
    with pytest.raises(TypeError, match="codec 'json'"):
        task.add("app.enc", {"x": object()}, TWA_NONE)
    with pytest.raises(ValueError, match="codec 'json'"):
        task.add("app.enc", float("nan"), TWA_NONE)          # not JSON
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="codec 'json'"):
        task.add("app.enc", cyclic, TWA_NONE)
    with pytest.raises(TypeError, match="codec 'pickle'"):
        task.add("app.enc.pickle", lambda: None, TWA_NONE)
    with pytest.raises(PayloadTooLargeError, match="payload_size"):
        task.add("app.enc", "x" * 63, TWA_NONE)               # 65 bytes once quoted
    with pytest.raises(TypeError, match="codec 'json'"):
        task.add_many("app.enc", [{"ok": 1}, {"bad": object()}], TWA_NONE)
    with pytest.raises(PayloadTooLargeError):
        task.add_many("app.enc", [{"ok": 1}, "y" * 100], TWA_NONE)
    with pytest.raises(TypeError, match="codec 'json'"):
        task.add_keyed("app.enc", {"bad": object()}, TWA_NONE, key="k1")
    with pytest.raises(PayloadTooLargeError):
        task.add_keyed("app.enc", "z" * 100, TWA_NONE, key="k2")
    assert dom.pool_free() == free
    assert task.run() == 0
    # what fits still goes
    task.add("app.enc", "x" * 62, TWA_NONE)
    assert task.run() == 1


# ---- pickle and who can write the domain --------------------------------------------------

@pytest.mark.parametrize("mode", [0o660, 0o666, 0o620, 0o602], ids=oct)
def test_pickle_is_refused_in_a_domain_another_user_can_write(make_domain, declared, mode):
    dom = make_domain("shared", mode=mode)
    declared("app.unsafe", "pickle")
    task = dom.register("w")
    free = dom.pool_free()
    for payload in ({"a": 1}, b"already pickled"):
        with pytest.raises(PermissionError, match="pickle.*mode"):
            task.add("app.unsafe", payload, TWA_NONE)
    # nothing was recorded either: a name-only sender cannot use it
    assert codec_recorded(dom, "app.unsafe") in (lib.TW_CODEC_RAW, -errno.ENOENT)
    assert dom.pool_free() == free
    assert task.run() == 0


def test_pickle_recorded_while_private_is_refused_once_others_can_write(make_domain, declared,
                                                                       spawn):
    dom = make_domain("chmod")
    seen = declared("app.later", "pickle")
    task = dom.register("w")
    task.add("app.later", {"ok": 1}, TWA_NONE)              # private: fine
    assert codec_recorded(dom, "app.later") == lib.TW_CODEC_PICKLE
    os.chmod("/dev/shm" + dom.name, 0o666)
    # a sender that knows only the name is refused too, and queues nothing
    out = spawn("""
        import sys
        from shm_taskwork import Domain
        from shm_taskwork.constants import TWA_NONE
        dom = Domain.open(sys.argv[1])
        try:
            dom.task(int(sys.argv[2])).add("app.later", {"x": 1}, TWA_NONE)
            print("queued")
        except PermissionError as exc:
            print("PermissionError", exc)
    """, dom.name, str(task.id)).communicate(timeout=30)[0]
    assert out.startswith("PermissionError") and "0o666" in out, out
    # and the callback will not unpickle what is already queued
    assert task.run() == 1
    with pytest.raises(PermissionError, match="pickle"):
        seen[0].value
    assert dom.pool_free() == dom.pool_size


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a segment to another user needs root")
def test_pickle_is_refused_in_a_domain_another_user_owns(make_domain, declared):
    dom = make_domain("owner")
    declared("app.owned", "pickle")
    os.chown("/dev/shm" + dom.name, 4242, -1)
    task = dom.register("w")
    with pytest.raises(PermissionError, match="uid 4242"):
        task.add("app.owned", {"a": 1}, TWA_NONE)
    assert dom.pool_free() == dom.pool_size
