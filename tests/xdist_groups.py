"""``--dist loadgroup`` for pytest 9: the tests marked ``@pytest.mark.xdist_group(NAME)`` run on one
worker, each group as one unit of work.

pytest-xdist 3.8 groups by a ``@NAME`` suffix it writes into each item's node id, which pytest 9
no longer reads (a node id is now built from a structured ``NodeId``), so every marked test was
scheduled alone and the one 2-process launch (``launched_jobs``) ran on both workers. This
scheduler finds the groups itself, from the test files' source (the marker on each function), and
hands xdist's scope scheduling a scope per group; every other test is its own scope, as ``load``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from xdist.scheduler import LoadScopeScheduling

ROOT = Path(__file__).resolve().parents[1]


@cache
def groups_in(path: str) -> dict[str, str]:
    """``{test function: group}`` of the functions of one test file marked ``xdist_group(NAME)``."""
    found = {}
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", None) == "xdist_group"
                    and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                found[node.name] = str(decorator.args[0].value)
    return found


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling, a scope being a marked test's group, else the test itself."""

    def _split_scope(self, nodeid: str) -> str:
        path, _, rest = nodeid.partition("::")
        function = rest.split("[", 1)[0].split("::")[-1]
        group = groups_in(path).get(function) if path.endswith(".py") else None
        return f"group:{group}" if group else nodeid
