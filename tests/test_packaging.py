"""Packaging (docs/contract.md "In the ecosystem"): one installed package, the stable-ABI tag, the licence.

The wheel is built from this tree with ``pip wheel`` and installed into a
fresh virtual environment; its commands then run from a directory that has an
unrelated ``tools/`` package of its own, which must not be picked up. The
source tree itself (editable install) and children started with
``PYTHONPATH=<repo root>`` must find ``shm_taskwork.tools`` too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import ROOT, python_script

import shm_taskwork

ABI3 = not hasattr(sys, "gettotalrefcount") and not sysconfig.get_config_var("Py_GIL_DISABLED")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv already has setuptools, wheel and cffi,
    # and the test must not depend on reaching a package index.
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    [whl] = [p for p in os.listdir(out) if p.endswith(".whl")]
    return str(out / whl)


def test_wheel_installs_one_top_level_package_with_its_licence(wheel):
    name = os.path.basename(wheel)
    if ABI3:
        assert "-cp311-abi3-" in name, name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        dist_info = [t for t in tops if t.endswith(".dist-info")]
        assert tops == {"shm_taskwork", *dist_info} and len(dist_info) == 1, tops
        di = dist_info[0]
        assert z.read(f"{di}/top_level.txt").decode().split() == ["shm_taskwork"]
        assert f"{di}/licenses/LICENSE" in names
        assert "MIT License" in z.read(f"{di}/licenses/LICENSE").decode()
        assert "shm_taskwork/py.typed" in names
        tools = {n for n in names if n.startswith("shm_taskwork/tools/")}
        for mod in ("__init__", "_common", "admin", "demo", "export", "status", "stress",
                    "top", "bench"):
            assert f"shm_taskwork/tools/{mod}.py" in tools, mod
        sos = [n for n in names if n.endswith(".so")]
        assert len(sos) == 1, sos
        if ABI3:
            assert sos == ["shm_taskwork/_taskwork_cffi.abi3.so"]
            wheel_meta = z.read(f"{di}/WHEEL").decode()
            assert "Tag: cp311-abi3-" in wheel_meta, wheel_meta


def test_installed_wheel_runs_beside_an_unrelated_tools_package(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = str(venv / "bin" / "python")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q",
                        "--no-deps", "--no-index", wheel], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    # The dependencies (psutil, rich, ...) come from this test's environment,
    # appended after the new venv's own site-packages: nothing is downloaded.
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_path("purelib")
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as f:
        f.write(deps + "\n")
    # a user's project with its own tools/ package, where the commands run
    proj = tmp_path / "project"
    (proj / "tools").mkdir(parents=True)
    (proj / "tools" / "__init__.py").write_text("")
    for mod in ("demo", "admin", "status", "_common"):
        (proj / "tools" / f"{mod}.py").write_text("raise SystemExit('the wrong tools package')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=proj, env=env, capture_output=True, text=True,
                              timeout=120)

    r = run(str(venv / "bin" / "shm-taskwork"), "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"shm-taskwork {shm_taskwork.__version__}"
    r = run(py, "-m", "shm_taskwork.cli", "demo", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: shm-taskwork demo")
    r = run(py, "-c", "import shm_taskwork.tools.demo as d, shm_taskwork as p; "
                      "print(d.__file__); print(p.__file__)")
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(site) for line in r.stdout.split()), (site, r.stdout)
    # a user's strictly typed program, checked against the installed package
    # (its py.typed marker): mypy --strict reports nothing
    import shutil
    shutil.copy(os.path.join(ROOT, "examples", "typed_usage.py"), proj / "typed_usage.py")
    r = run(sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-executable",
            py, "typed_usage.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout
    # the real thing from the wheel: workers started with `-m shm_taskwork.tools.demo`
    r = run(py, "-m", "shm_taskwork.cli", "demo", "--works", "5", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    assert '"problems": []' in r.stdout


def test_source_tree_children_find_the_tools_package():
    """A child started with PYTHONPATH=<repo root> (as the tests and the tools
    start theirs) imports the package from the tree and its tools with it."""
    p = python_script("""
        import shm_taskwork, shm_taskwork.tools.stress as s, shm_taskwork.cli as c
        import importlib
        for mod, _ in c.COMMANDS.values():
            importlib.import_module(mod)
        print(shm_taskwork.__file__); print(s.__file__)
    """)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    pkg, tools = out.split()
    assert pkg == os.path.join(ROOT, "shm_taskwork", "__init__.py")
    assert tools == os.path.join(ROOT, "tools", "stress.py")
