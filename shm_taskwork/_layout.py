"""The segment's layout, described in pure Python.

An independent description of ``native/taskwork.h``: field types in order,
laid out with the C alignment rules (each field at a multiple of its
alignment, a struct's size rounded up to its largest alignment). It needs no
compiled code, so a tool can read a domain's header from a file or an mmap
without the native core; the tests check every offset here against the C
compiler's. If the two ever disagree, the layout version must change.
"""
from __future__ import annotations

import platform
import struct

MAGIC = b"SHMTWRK\x01"
LAYOUT_VERSION = 12
NIL = 0xFFFFFFFF
EXITED = 0xFFFFFFFE
DEAD_EMPTY = 0xFFFFFFFD
DEAD_BIT = 0x80000000
FD_TOKEN_LEN = 16
NAME_LEN = 48
FUNC_NAME_LEN = 112
ORIGIN_LEN = 128
INTENTS = 8
HIST_BUCKETS = 28
HIST_SHIFT = 10
KEYS_CAP = 4096
# the key tags after the key table: one 16-bit tag per entry (tw_layout.h "Key tags")
KEY_TAGS_SIZE = KEYS_CAP * 2
OUTCOMES_DEFAULT = 4096

# sizeof(pthread_mutex_t) in glibc, by machine; alignment is 8 (4 on 32-bit x86).
_MUTEX = {"x86_64": 40, "aarch64": 48, "ppc64le": 40, "s390x": 40, "riscv64": 40, "i686": 24}
MUTEX_SIZE = _MUTEX.get(platform.machine(), 40)
MUTEX_ALIGN = 4 if MUTEX_SIZE == 24 else 8

# scalar type -> (struct code, size)
_SCALARS = {"u32": ("I", 4), "i32": ("i", 4), "u64": ("Q", 8), "i64": ("q", 8)}


class Struct:
    """A C struct: ``fields`` is a list of (name, type, count); type is a
    scalar name, ``"char"``, ``"mutex"`` or another :class:`Struct`."""

    def __init__(self, cname: str, fields: list[tuple]):
        self.cname = cname
        self.fields = fields
        self.offsets: dict[str, int] = {}
        self.types: dict[str, object] = {}
        off = 0
        align = 1
        for name, typ, count in fields:
            size, al = _size_align(typ)
            off = (off + al - 1) // al * al
            self.offsets[name] = off
            self.types[name] = (typ, count)
            off += size * count
            align = max(align, al)
        self.align = align
        self.size = (off + align - 1) // align * align

    def read(self, buf, base: int = 0) -> dict:
        """Scalar and char-array fields of the struct at ``buf[base:]``."""
        out = {}
        for name, (typ, count) in self.types.items():
            off = base + self.offsets[name]
            if typ in _SCALARS:
                code, size = _SCALARS[typ]
                vals = struct.unpack_from(f"<{count}{code}", buf, off)
                out[name] = vals[0] if count == 1 else list(vals)
            elif typ == "char":
                out[name] = bytes(buf[off:off + count])
            elif isinstance(typ, Struct) and count == 1:
                out[name] = typ.read(buf, off)
        return out


def _size_align(typ) -> tuple[int, int]:
    if isinstance(typ, Struct):
        return typ.size, typ.align
    if typ == "char":
        return 1, 1
    if typ == "mutex":
        return MUTEX_SIZE, MUTEX_ALIGN
    size = _SCALARS[typ][1]
    return size, size


HEADER = Struct("struct tw_header", [
    ("magic", "char", 8),
    *[(f, "u32", 1) for f in ("layout_version", "node_size", "header_size", "slot_size",
                              "max_tasks", "pool_size", "payload_size", "max_procs",
                              "names_cap", "record_origin")],
    *[(f, "u64", 1) for f in ("slots_off", "procs_off", "names_off", "nodes_off",
                              "total_size", "created_ns", "free_head", "dl_head",
                              "dl_count", "fsck_runs", "reaped", "procs_reclaimed")],
    ("keys_off", "u64", 1), ("keys_next", "u64", 1), ("keys_cap", "u32", 1),
    ("out_cap", "u32", 1), ("out_off", "u64", 1), ("out_seq", "u64", 1),
    ("out_rec_size", "u32", 1), ("out_pad", "u32", 1),
    ("dl_lock", "mutex", 1),
    ("fsck_lock", "mutex", 1),
    ("keys_lock", "mutex", 1),
    ("pad", "char", 64),
])

COUNTERS = Struct("struct tw_counters", [
    *[(f, "u64", 1) for f in ("added", "run", "cancelled", "orphaned", "errors", "unknown",
                              "signals_sent", "resumes_sent", "interrupted")],
    ("queued", "i64", 1),
    ("max_pending", "u64", 1),
    ("sig_ack", "u64", 1),
    ("signals_resent", "u64", 1),
])

HIST = Struct("struct tw_hist", [("bucket", "u64", HIST_BUCKETS), ("sum_ns", "u64", 1)])

LIFE = Struct("struct tw_life", [("word", "u32", 1), ("pad", "u32", 1), ("next", "u64", 1)])

SLOT = Struct("struct tw_slot", [
    ("head", "u64", 1), ("state", "u32", 1), ("gen", "u32", 1), ("flags", "u32", 1),
    ("pid", "i32", 1), ("start_ticks", "u64", 1), ("registered_ns", "u64", 1),
    ("signum", "i32", 1), ("efd", "i32", 1), ("uid", "u32", 1), ("lock_recovered", "u32", 1),
    ("name_id", "u64", 1), ("fd_token", "char", FD_TOKEN_LEN), ("name", "char", NAME_LEN),
    ("c", COUNTERS, 1), ("latency", HIST, 1), ("duration", HIST, 1), ("pi_lock", "mutex", 1), ("life", LIFE, 1), ("pad", "char", 64),
])

PROC = Struct("struct tw_proc", [
    ("pid", "u64", 1), ("start_ticks", "u64", 1), ("intent", "u64", INTENTS),
    ("life", LIFE, 1),
])

NAME = Struct("struct tw_name", [
    ("id", "u64", 1), ("ready", "u32", 1), ("len", "u32", 1), ("codec", "u32", 1),
    ("codec_pad", "u32", 1), ("name", "char", FUNC_NAME_LEN),
    ("latency", HIST, 1), ("duration", HIST, 1),
])

NODE = Struct("struct tw_node", [
    ("owner", "u64", 1), ("next", "u32", 1), ("payload_len", "u32", 1), ("func_id", "u64", 1),
    ("enqueued_ns", "u64", 1), ("sender_pid", "i32", 1), ("target", "u32", 1),
    ("target_gen", "u32", 1), ("origin_len", "u32", 1), ("reason", "u32", 1),
    ("note", "u32", 1), ("name_id", "u64", 1), ("started_ns", "u64", 1),
    ("track", "u32", 1), ("wake", "u32", 1),
])

KEY = Struct("struct tw_key", [
    ("key", "u64", 1), ("work", "u64", 1), ("word", "u64", 1), ("proc", "u32", 1),
    ("want", "u32", 1), ("slot", "u32", 1), ("pad", "u32", 1),
])

OUTCOME = Struct("struct tw_outcome", [
    ("seq", "u64", 1), ("work", "u64", 1), ("retried_as", "u64", 1), ("settled_ns", "u64", 1),
    ("outcome", "u32", 1), ("len", "u32", 1), ("slot", "u32", 1), ("pad", "u32", 1),
])

STRUCTS = (HEADER, COUNTERS, HIST, LIFE, SLOT, PROC, NAME, NODE, KEY, OUTCOME)


def _align64(x: int) -> int:
    return (x + 63) & ~63


def node_size(payload_size: int, record_origin: bool) -> int:
    """Bytes per pool node: header, the origin if recorded, the payload; 64-aligned."""
    return _align64(NODE.size + (ORIGIN_LEN if record_origin else 0) + payload_size)


def outcome_rec_size(payload_size: int) -> int:
    """Bytes per outcome record: its header and room for a result; 64-aligned."""
    return _align64(OUTCOME.size + payload_size)


def offsets(max_tasks: int, pool_size: int, payload_size: int, max_procs: int,
            names_cap: int, record_origin: bool, outcomes: int = OUTCOMES_DEFAULT) -> dict:
    """Where each table starts, and the segment's total size."""
    slots = _align64(HEADER.size)
    procs = slots + _align64(max_tasks * SLOT.size)
    names = procs + _align64(max_procs * PROC.size)
    nodes = names + _align64(names_cap * NAME.size)
    keys = nodes + pool_size * node_size(payload_size, record_origin)
    out = _align64(keys + KEYS_CAP * KEY.size + KEY_TAGS_SIZE)
    total = out + outcomes * outcome_rec_size(payload_size)
    return {"slots_off": slots, "procs_off": procs, "names_off": names,
            "nodes_off": nodes, "keys_off": keys, "out_off": out, "total_size": total}


def read_header(buf) -> dict:
    """The header fields of a mapped segment (any buffer from offset 0)."""
    return HEADER.read(buf)


def read_slot(buf, header: dict, i: int) -> dict:
    return SLOT.read(buf, header["slots_off"] + i * SLOT.size)


def read_node(buf, header: dict, i: int) -> dict:
    """One node's fields, plus its origin and payload bytes."""
    base = header["nodes_off"] + i * header["node_size"]
    out = NODE.read(buf, base)
    origin_off = base + NODE.size
    payload_off = origin_off + (ORIGIN_LEN if header["record_origin"] else 0)
    out["origin"] = bytes(buf[origin_off:origin_off + out["origin_len"]]) \
        if header["record_origin"] else b""
    out["payload"] = bytes(buf[payload_off:payload_off + out["payload_len"]])
    return out
