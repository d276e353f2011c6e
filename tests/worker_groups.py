"""How `make test` splits the suite over two pytest-xdist workers (`-n 2`): every test of the demo run (the
`demo_repo` fixture: built once, then used by one process at a time, as DVC locks its repo) in one group, the other
tests a file at a time (a file's own session fixtures are built once), the demo's group first, as the longest.

pytest-xdist's own `--dist loadgroup` cannot carry the groups under pytest 9 (it appends them to `item._nodeid`,
which pytest 9 no longer reads), so the workers write each test's group to a file the controller's scheduler reads:
the workers collect, the controller only sees test ids. conftest.py imports these hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

DEMO_GROUP = "demo_repo"
GROUPS_FILE = "VOXTRAL_TEST_GROUPS"  # environment: where the workers write the groups, set by the controller


def group_of(item: pytest.Item) -> str:
    return DEMO_GROUP if DEMO_GROUP in getattr(item, "fixturenames", ()) else item.nodeid.partition("::")[0]


def pytest_configure(config: pytest.Config) -> None:
    """The controller, before it starts the workers (they and their subprocesses inherit its environment): where
    they write the groups, and one OpenMP thread each, as torch's threads of one worker would take (and spin on) the
    core the other worker runs on. Tests that measure thread counts set their own (test_determinism.py)."""
    distributed = config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None)
    if distributed and not hasattr(config, "workerinput"):
        os.environ[GROUPS_FILE] = str(Path(tempfile.mkdtemp(prefix="xdist-groups-")) / "groups.json")
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    if GROUPS_FILE in os.environ and not hasattr(config, "workerinput"):
        shutil.rmtree(Path(os.environ.pop(GROUPS_FILE)).parent, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: group_of(item) != DEMO_GROUP)  # stable: the demo's tests first
    if hasattr(config, "workerinput"):  # every worker collects the same tests: the last write is as good as any
        path = Path(os.environ[GROUPS_FILE])
        staging = path.with_name(f"{path.name}.{os.getpid()}")
        staging.write_text(json.dumps({item.nodeid: group_of(item) for item in items}))
        os.replace(staging, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        """pytest-xdist's scope scheduling (a scope's tests on one worker), the scopes being the groups above."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once every worker has collected (and so written the file)
                self.groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text())
            return self.groups[nodeid]

    config.option.loadscopereorder = False  # the collection's order: the demo's group first
    return ByGroup(config, log)
