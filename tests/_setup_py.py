"""setup.py's constants and helper functions, without running setup() (importing it would build)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_py_namespace():
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [node for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets))]
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace
