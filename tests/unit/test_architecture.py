"""Data flows one way: schemas ← infra ← producers / consumers / dashboard; those three never import each other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "schemas": {"schemas"},
    "infra": {"schemas", "infra"},
    "producers": {"schemas", "infra", "producers"},
    "consumers": {"schemas", "infra", "consumers"},
    "dashboard": {"schemas", "infra", "dashboard"},
}
# The one crossing: the dashboard's roles and registry actions go through the governance package itself, as the
# CLI's do, so the four-eyes rule, the roles file and their audit entries have one implementation, not a copy.
ALSO_ALLOWED = {"dashboard": ("trainwire.consumers.governance",)}


def trainwire_imports(path: Path, stage: str) -> set[str]:
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if name.startswith(ALSO_ALLOWED.get(stage, ())):
                continue
            if parts[0] == "trainwire":
                stages.add(parts[1] if len(parts) > 1 else "trainwire")
    return stages


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_what_is_below_it(stage):
    for path in (ROOT / stage).rglob("*.py"):
        bad = trainwire_imports(path, stage) - ALLOWED[stage]
        assert not bad, f"{path.relative_to(ROOT)} imports trainwire.{', trainwire.'.join(sorted(bad))}"
