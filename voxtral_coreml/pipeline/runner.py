"""Entry points print one line for a user's mistake and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from .errors import VoxtralError

EXIT_USER_ERROR = 2
# Known and harmless, so dropped: coremltools warns on import that it has not tested our torch and scikit-learn (the
# pins in requirements.lock are tested here), and each of its modules that wants the macOS-only Core ML runtime
# warns that it cannot load it (`Failed to load _MLModelProxy: ... libcoremlpython`; 14 lines on Linux).
KNOWN_VERSION_WARNINGS = ("has not been tested with coremltools", "scikit-learn version", "libcoremlpython")
# Apple's Core AI runtime (coreai-core: Swift and C++) keeps worker threads that outlive its predictors; the C++ static
# destructors of a normal interpreter exit can race them and abort the finished process ("C++ exception handling
# detected but the Swift runtime was compiled with exceptions disabled", SIGABRT). Once it is loaded, a process ends
# without them (output flushed first).
CORE_AI_NATIVE_MODULES = ("coreai.runtime._coreai_runtime", "odie_runner.coreai_runtime._coreai_runtime")


class _DropKnownVersionWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in KNOWN_VERSION_WARNINGS)


_DROP_KNOWN = _DropKnownVersionWarnings()


def silence_known_warnings() -> None:
    """Drop them where every record passes: the root logger's handlers (a filter on the `coremltools` logger misses
    its child loggers' records) and Python's last-resort handler (which prints them when coremltools is imported
    before logging is configured, as a stage's imports do). Idempotent."""
    for handler in (*logging.getLogger().handlers, logging.lastResort):
        if handler is not None:
            handler.addFilter(_DROP_KNOWN)


def configure_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("coremltools", "httpx", "urllib3", "filelock", "torch"):
        # Their INFO lines are per op or per request; progress bars already show progress.
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_known_warnings()


def run(main: Callable[[], object], debug: bool | None = None) -> NoReturn:
    debug = bool(os.environ.get("VOXTRAL_COREML_DEBUG")) if debug is None else debug
    configure_logging(debug)
    try:
        main()
    except VoxtralError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        exit_process(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_process(130)
    exit_process(0)


def exit_process(code: int) -> NoReturn:
    if not any(name in sys.modules for name in CORE_AI_NATIVE_MODULES):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def stage_args(description: str | None, *names: str) -> argparse.Namespace:
    """A stage script's positional arguments (model, recipe, ...), as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=description)
    for name in names:
        parser.add_argument(name)
    return parser.parse_args()
