import sys
import sysconfig

from setuptools import setup

# cffi builds the extension for the stable ABI (``_taskwork_cffi.abi3.so``) on
# a regular CPython: not on a debug build, not on a free-threaded one. The
# wheel's tag says so then (cp311-abi3: any CPython from 3.11 on).
ABI3 = (sys.implementation.name == "cpython" and not hasattr(sys, "gettotalrefcount")
        and not sysconfig.get_config_var("Py_GIL_DISABLED"))

setup(cffi_modules=["native/build_ffi.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp311"}} if ABI3 else {})
