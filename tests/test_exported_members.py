"""kiban's public surface: what a service may import, locked.

Everything else lives in private modules (``kiban/_name.py``) that may change in any
release. ``__all__`` of each public module is the lock (httpx's rule): every public
class or function reachable there is in it, and the tests below fail otherwise.
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

import kiban
import kiban.database
import kiban.dev
import kiban.grpc
import kiban.security
import kiban.testing

PUBLIC = ["kiban", "kiban.security", "kiban.database", "kiban.dev", "kiban.grpc", "kiban.testing"]
#: Public modules: the package, and the integrations a service imports by name.
PUBLIC_MODULES = {"__init__", "__main__", "database", "dev", "grpc", "testing", "security/__init__"}


@pytest.mark.parametrize("module", PUBLIC)
def test_all_public_members_are_exported(module: str) -> None:
    """``__all__`` is the lock, and every public attribute is in it (httpx's rule)."""
    found = importlib.import_module(module)
    for name in found.__all__:
        assert hasattr(found, name), name
    # Every class or function of kiban's reachable here without an underscore is public.
    exposed = {
        name
        for name, value in vars(found).items()
        if not name.startswith("_")
        and isinstance(value, type | types.FunctionType)
        and value.__module__.startswith("kiban")
    }
    assert exposed <= set(found.__all__), exposed - set(found.__all__)
    # And no one else's class or function is passed off as kiban's.
    for name in found.__all__:
        value = getattr(found, name)
        if isinstance(value, type | types.FunctionType):
            assert value.__module__.startswith("kiban"), (name, value.__module__)


def test_every_other_module_is_private() -> None:
    """A module a service could import by accident has a leading underscore."""
    package = Path(kiban.__file__).parent
    public = sorted(
        str(path.relative_to(package).with_suffix(""))
        for path in package.rglob("*.py")
        if "_service_template" not in path.parts  # a service's files, not kiban's modules
        and not any(
            part.startswith("_") and part not in {"__init__.py", "__main__.py"}
            for part in path.relative_to(package).parts
        )
    )
    assert set(public) == PUBLIC_MODULES


def test_public_members_say_what_they_are() -> None:
    """Each public class and function has a docstring a user reads in their editor."""
    for module in PUBLIC:
        found = importlib.import_module(module)
        for name in found.__all__:
            value = getattr(found, name)
            if isinstance(value, type | types.FunctionType):
                assert (value.__doc__ or "").strip(), f"{module}.{name} has no docstring"


def _imports(path: Path) -> set[str]:
    """The kiban modules ``path`` imports, at any depth, except for type checking."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kiban"):
            module = node.module or ""
            if module == "kiban":
                found.update(f"kiban.{alias.name}" for alias in node.names)
            else:
                found.add(module)
    return found


def test_no_import_cycles() -> None:
    """Modules form layers: none needs, even lazily, a module that needs it back."""
    package = Path(kiban.__file__).parent
    graph = {}
    for path in package.rglob("*.py"):
        if "_service_template" in path.parts:
            continue
        name = ".".join(("kiban", *path.relative_to(package).with_suffix("").parts))
        graph[name.removesuffix(".__init__")] = _imports(path) - {"kiban"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for step in graph.get(start, ()):
            if step == target or (step not in seen and reaches(step, target, seen | {step})):
                return True
        return False

    cycles = [name for name in graph if name != "kiban" and reaches(name, name, {"kiban"})]
    assert cycles == []
