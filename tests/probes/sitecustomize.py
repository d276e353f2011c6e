"""Test probes in every Python process of a test's subprocess tree (dvc and the stages it runs).

Python imports `sitecustomize` at startup; tests put this folder on PYTHONPATH and set:

- VOXTRAL_PROBE_UNPICKLE_LOG=FILE: every call of pickle.load/loads/Unpickler, torch.load and
  numpy.load(allow_pickle=True) appends a JSON line (what, the process's argv, the caller) to FILE, and so
  does each probed process when it exits, by atexit or os._exit ("probed"), to show the probe was there.
- VOXTRAL_PROBE_PAUSE_AT=module:function and VOXTRAL_PROBE_PAUSE_MARKER=FILE: the first call of that function
  (or its Nth, with VOXTRAL_PROBE_PAUSE_CALL=N) creates FILE and sleeps, so a test can SIGKILL the process at
  exactly that point of its work.

Nothing happens without these variables: the probes only wrap functions, never change what they return.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import json
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType

PAUSE_SECONDS = 600  # the test kills the process long before


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call `patch(module)` once `name` is imported (now, if it already is)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(module: ModuleType) -> None:
                    execute(module)
                    patch(module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, Finder())


def _log_unpickling(log: str) -> None:
    def record(what: str) -> None:
        stack = traceback.extract_stack()
        caller = stack[-3] if len(stack) > 2 else stack[0]
        entry = {"what": what, "argv": sys.argv, "caller": f"{caller.filename}:{caller.lineno}"}
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def recording(what: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            record(what)
            return function(*args, **kwargs)

        return wrapper

    class Unpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            record("pickle.Unpickler")
            super().__init__(*args, **kwargs)

    pickle.load = recording("pickle.load", pickle.load)
    pickle.loads = recording("pickle.loads", pickle.loads)
    pickle.Unpickler = Unpickler  # type: ignore[misc]

    def patch_torch(torch: ModuleType) -> None:
        torch.load = recording("torch.load", torch.load)

    def patch_numpy(numpy: ModuleType) -> None:
        load = numpy.load

        def checked(*args, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("allow_pickle"):
                record("numpy.load(allow_pickle=True)")
            return load(*args, **kwargs)

        numpy.load = checked

    _after_import("torch", patch_torch)
    _after_import("numpy", patch_numpy)
    atexit.register(record, "probed")
    exit_now = os._exit

    def probed_exit(code: int) -> None:  # runner.exit_process ends a Core AI process so, skipping atexit
        record("probed")
        exit_now(code)

    os._exit = probed_exit


def _pause_at(target: str, marker: str, call: int) -> None:
    module_name, function_name = target.split(":")
    calls = 0

    def patch(module: ModuleType) -> None:
        function = getattr(module, function_name)

        def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == call:
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(PAUSE_SECONDS)
            return function(*args, **kwargs)

        setattr(module, function_name, paused)

    _after_import(module_name, patch)


if os.environ.get("VOXTRAL_PROBE_UNPICKLE_LOG"):
    _log_unpickling(os.environ["VOXTRAL_PROBE_UNPICKLE_LOG"])
if os.environ.get("VOXTRAL_PROBE_PAUSE_AT"):
    _pause_at(
        os.environ["VOXTRAL_PROBE_PAUSE_AT"],
        os.environ["VOXTRAL_PROBE_PAUSE_MARKER"],
        int(os.environ.get("VOXTRAL_PROBE_PAUSE_CALL", "1")),
    )
