"""The house's rules (README "Architecture"), checked on the source.

- The package is layered: a module imports only modules below it in LAYERS
  (imports made only for type annotations, under ``if TYPE_CHECKING:``, are
  not imports at run time and are not counted). So there is no import circle.
- Only the modules in LIB_CALLERS call the compiled core (``lib``/``ffi``).
- ``tools/`` use the public API and ``shm_taskwork.observe`` only: no
  ``_native``, no ``ffi``/``lib``, no private attribute of a package object.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "shm_taskwork")

# bottom to top: each module may import only from the ones before it
LAYERS = [
    "_layout", "errors", "codec", "_native", "constants", "signals", "systemd", "_security",
    "segment", "outcomes", "work",
    "callbacks", "part", "names", "reader", "keys", "notify", "task", "letters", "table", "_run", "_aio",
    "registration", "observe", "fsck", "domain", "kernel", "remote", "__init__", "cli",
]

# the modules that may touch the compiled core
LIB_CALLERS = {"_native", "constants", "_security", "segment", "outcomes", "names", "reader",
               "keys", "notify", "task", "letters", "table", "_run", "_aio", "registration",
               "observe", "fsck", "domain"}


def _modules() -> list[str]:
    out = []
    for name in sorted(os.listdir(PKG)):
        if name.endswith(".py"):
            out.append(name[:-3])
        elif os.path.isdir(os.path.join(PKG, name)) and \
                os.path.exists(os.path.join(PKG, name, "__init__.py")) and name != "tools":
            out.append(name)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _source(mod: str) -> str:
    path = os.path.join(PKG, mod + ".py")
    if not os.path.exists(path):
        path = os.path.join(PKG, mod, "__init__.py")
    with open(path) as f:
        return f.read()


def _package_imports(mod: str) -> set[str]:
    """The package's modules that ``mod`` imports at run time."""
    got = set()
    for node in _runtime_nodes(ast.parse(_source(mod))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("shm_taskwork"):
                base = (node.module or "")
                base = base[len("shm_taskwork."):] if base.startswith("shm_taskwork.") else base
                if base in ("", "shm_taskwork"):
                    got.update(a.name for a in node.names)
                else:
                    got.add(base.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("shm_taskwork."):
                    got.add(a.name.split(".")[1])
    return {m for m in got if m in LAYERS and m != "_taskwork_cffi"}


def test_every_module_has_a_layer():
    assert set(_modules()) - {"_taskwork_cffi"} <= set(LAYERS), \
        "a new module must be given a layer in LAYERS (and in the README)"


def test_a_module_imports_only_from_below():
    wrong = []
    for mod in _modules():
        if mod not in LAYERS:
            continue
        rank = LAYERS.index(mod)
        for dep in _package_imports(mod):
            if LAYERS.index(dep) >= rank:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, wrong


def test_only_the_core_layers_call_the_compiled_core():
    callers = set()
    for mod in _modules():
        if mod not in LAYERS:
            continue
        for node in _runtime_nodes(ast.parse(_source(mod))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ("lib", "ffi"):
                callers.add(mod)
                break
    assert callers <= LIB_CALLERS, callers - LIB_CALLERS


# remote/, bottom to top
REMOTE_LAYERS = ["scripts", "wake", "sender", "killpoints", "checks", "status", "watcher", "local",
                 "bridge"]


def test_the_remote_package_is_layered_and_never_calls_the_core():
    """remote/: scripts < wake < sender < killpoints < checks < status < watcher
    < local < bridge (the bridge composes the parts below it), and no
    lib/ffi (it uses the API)."""
    order = REMOTE_LAYERS
    wrong = []
    for i, mod in enumerate(order):
        tree = ast.parse(open(os.path.join(PKG, "remote", mod + ".py")).read())
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                wrong += [f"remote.{mod} imports remote.{n}" for n in names
                          if n in order and order.index(n) >= i]
            if isinstance(node, ast.Name) and node.id in ("lib", "ffi"):
                wrong.append(f"remote.{mod} uses {node.id}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_native"):
                wrong.append(f"remote.{mod} imports _native")
    assert not wrong, wrong


def test_every_remote_module_has_a_layer():
    mods = {n[:-3] for n in os.listdir(os.path.join(PKG, "remote"))
            if n.endswith(".py") and n != "__init__.py"}
    assert mods == set(REMOTE_LAYERS), \
        "a new remote module must be given a layer in REMOTE_LAYERS (and in the README)"


TOOLS = os.path.join(ROOT, "tools")
# objects of the tools' own making whose private attributes they may use
_OWN = {"self", "cls", "sys", "os"}


def test_tools_use_the_public_api_only():
    wrong = []
    for name in sorted(os.listdir(TOOLS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(TOOLS, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and (
                    node.module.startswith("shm_taskwork._")
                    or node.module.startswith("shm_taskwork") and any(
                        a.name.startswith("_") for a in node.names)):
                wrong.append(f"{name}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Name) and node.id in ("ffi", "lib"):
                wrong.append(f"{name}:{node.lineno} uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__") and not (
                        isinstance(node.value, ast.Name) and node.value.id in _OWN):
                wrong.append(f"{name}:{node.lineno} reaches .{node.attr}")
    assert not wrong, wrong
