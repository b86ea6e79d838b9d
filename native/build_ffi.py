"""cffi (API mode) builder for the native core: ``shm_taskwork._taskwork_cffi``.

Reads top to bottom: options, ``set_source``, ``cdef``. The cdef is derived
from ``taskwork.h`` itself, with the local headers it includes (``tw_layout.h``,
the shared layout) read in place of their ``#include`` line, so the structs,
prototypes and constants Python sees are the ones the C compiler checked:
every ``#define`` becomes ``...`` (its value comes from C) and
``pthread_mutex_t`` is opaque.

Environment:
  SHM_TASKWORK_CFLAGS   extra compiler flags (``make test-asan`` passes
                        ``-fsanitize=address,undefined``)
"""
import os
import re
import shlex

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "taskwork.h")

extra_cflags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_cflags += shlex.split(os.environ.get("SHM_TASKWORK_CFLAGS", ""))
extra_ldflags = [f for f in shlex.split(os.environ.get("SHM_TASKWORK_CFLAGS", "")) if f.startswith("-fsanitize")]


def header_text(path: str) -> str:
    """The header at path with each local ``#include "x.h"`` replaced by x.h's
    text (recursively), as the C preprocessor would read it."""
    out = []
    with open(path) as f:
        for line in f:
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
            if m:
                out.append(header_text(os.path.join(os.path.dirname(path), m.group(1))))
            else:
                out.append(line)
    return "".join(out)


def cdef_from_header(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = ["typedef struct { ...; } pthread_mutex_t;"]
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define"):
            parts = s.split(None, 2)
            if len(parts) == 3 and not parts[2].startswith('"') and "(" not in parts[1]:
                value = parts[2].strip()
                m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)u?", value)
                # plain numbers stay numbers (array sizes need them); the rest
                # is left for the C compiler to fill in
                out.append(f"#define {parts[1]} {m.group(1) if m else '...'}")
            continue
        if s.startswith("#"):
            continue
        out.append(line)
    return "\n".join(out)


ffibuilder = FFI()

ffibuilder.set_source(
    "shm_taskwork._taskwork_cffi",
    '#include "taskwork.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, f"{name}.c"))
             for name in ("sys", "segment", "life", "sigwatch", "proc", "pool", "deadletter", "keys",
                         "task_work", "reap", "progress", "letters", "outcome")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=extra_cflags,
    extra_link_args=extra_ldflags,
    libraries=["pthread"],
)
ffibuilder.cdef(cdef_from_header(header_text(HEADER)))

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
