"""The pure-Python view of the segment (shm_taskwork._layout) equals the
layout the C compiler made: every field offset, every struct size, the total
size for several parameter sets, and the values read from a live segment."""
from __future__ import annotations

import mmap
import os

import pytest

from shm_taskwork import TWA_NONE, callback
from shm_taskwork import _layout as L
from shm_taskwork._native import ffi, lib


@callback(name="test.layout.noop")
def _noop(work):
    pass


def _c_fields(cname: str) -> list[tuple[str, int]]:
    return [(name, f.offset) for name, f in ffi.typeof(cname).fields]


@pytest.mark.parametrize("desc", L.STRUCTS, ids=lambda s: s.cname)
def test_struct_offsets_and_sizes_match_c(desc):
    assert desc.size == ffi.sizeof(desc.cname)
    assert desc.align == ffi.alignof(desc.cname)
    c_fields = _c_fields(desc.cname)
    # Same fields, same order, same offsets.
    assert [n for n, _ in c_fields] == [f[0] for f in desc.fields]
    for name, off in c_fields:
        assert desc.offsets[name] == off == ffi.offsetof(desc.cname, name), name


def test_mutex_and_constants_match_c():
    assert L.MUTEX_SIZE == ffi.sizeof("pthread_mutex_t")
    assert L.MUTEX_ALIGN == ffi.alignof("pthread_mutex_t")
    assert L.LAYOUT_VERSION == lib.tw_layout_version()
    assert L.NODE.size == lib.tw_node_header_size()
    assert (L.NIL, L.EXITED) == (lib.TW_NIL, lib.TW_EXITED)
    assert (L.NAME_LEN, L.FUNC_NAME_LEN, L.ORIGIN_LEN, L.INTENTS) == (
        lib.TW_NAME_LEN, lib.TW_FUNC_NAME_LEN, lib.TW_ORIGIN_LEN, lib.TW_INTENTS)


@pytest.mark.parametrize("params", [
    (1, 1, 0, 1, 1, 0, 1),
    (8, 256, 224, 96, 1024, 0, 4096),
    (8, 256, 224, 96, 1024, 1, 5),
    (64, 65536, 224, 320, 1024, 0, 4096),
    (3, 17, 1, 7, 5, 1, 3),
    (4096, 1000, 1 << 20, 65536, 1 << 20, 1, 1 << 20),
])
def test_layout_size_matches_c(params):
    max_tasks, pool_size, payload_size, max_procs, names_cap, origin, outcomes = params
    assert L.offsets(*params)["total_size"] == lib.tw_layout_size(*params)
    assert L.node_size(payload_size, bool(origin)) % 64 == 0


@pytest.mark.parametrize("record_origin", [False, True])
def test_live_header_read_through_python_view(make_domain, record_origin):
    dom = make_domain("layout", max_tasks=5, pool_size=37, payload_size=100,
                      record_origin=record_origin)
    path = "/dev/shm/" + dom.name.lstrip("/")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        h = L.read_header(m)
        assert h["magic"] == L.MAGIC
        assert h["layout_version"] == L.LAYOUT_VERSION
        assert h["max_tasks"] == dom.max_tasks == 5
        assert h["pool_size"] == dom.pool_size == 37
        assert h["payload_size"] == dom.payload_size == 100
        assert h["max_procs"] == dom.max_procs
        assert h["record_origin"] == int(record_origin)
        assert h["header_size"] == L.HEADER.size
        assert h["slot_size"] == L.SLOT.size
        assert h["node_size"] == L.node_size(100, record_origin) == dom._d.node_size
        expect = L.offsets(5, 37, 100, dom.max_procs, h["names_cap"], record_origin)
        for key, value in expect.items():
            assert h[key] == value == getattr(dom._d, key, value), key
        assert h["total_size"] == os.fstat(f.fileno()).st_size
        # A fresh pool: free list 0 -> 1 -> ..., no dead letters.
        assert h["free_head"] & 0xFFFFFFFF == 0
        assert h["dl_head"] == L.NIL and h["dl_count"] == 0


def test_live_slot_and_node_read_through_python_view(make_domain):
    dom = make_domain("layout", max_tasks=3, pool_size=8, payload_size=40, record_origin=True)
    task = dom.register(name="layout-view")
    try:
        work = task.add(_noop, b"seen from python", TWA_NONE)
        path = "/dev/shm/" + dom.name.lstrip("/")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            h = L.read_header(m)
            s = L.read_slot(m, h, task.id)
            assert s["pid"] == os.getpid()
            assert s["gen"] == task.gen
            assert s["name"].rstrip(b"\0") == b"layout-view"
            assert s["head"] == (task.gen << 32) | work.node   # the list holds our work
            assert s["state"] == lib.TW_SLOT_RUNNING
            assert s["c"] == {"added": 1, "run": 0, "cancelled": 0, "orphaned": 0,
                              "errors": 0, "unknown": 0, "signals_sent": 0,
                              "resumes_sent": 0, "interrupted": 0, "queued": 1,
                              "max_pending": 1, "sig_ack": 0, "signals_resent": 0}
            n = L.read_node(m, h, work.node)
            assert n["owner"] >> 32 == work.id >> 32                  # generation
            assert (n["owner"] >> 24) & 0xFF == lib.TW_N_QUEUED
            assert n["owner"] & 0xFFFFFF == task.id
            assert n["next"] == L.NIL
            assert n["payload"] == b"seen from python"
            assert n["func_id"] == work.func_id
            assert n["sender_pid"] == os.getpid()
            assert (n["target"], n["target_gen"]) == (task.id, task.gen)
            assert n["origin"].decode() == work.origin
        assert task.run() == 1
    finally:
        task.exit()
