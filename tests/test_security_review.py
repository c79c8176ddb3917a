"""The security review, in code: what the node's runtime packages may do with the
operating system. Received data (every DICOM string) reaches the node's code; these
checks make sure none of it can reach a command line or a file name, by allowing
processes nowhere and file-system changes only where names are the node's own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The packages the running node imports (training is offline, run by IT staff).
RUNTIME = ("dicom_node", "model")

#: Calls that start a process or run a shell.
PROCESS_CALLS = {
    ("subprocess", name) for name in ("run", "Popen", "call", "check_call", "check_output",
                                      "getoutput", "getstatusoutput")
} | {("os", name) for name in ("system", "popen", "execv", "execve", "execl", "execle",
                               "execlp", "execvp", "execvpe", "spawnl", "spawnv", "spawnve",
                               "posix_spawn", "posix_spawnp", "startfile")} | {
    ("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell"),
    ("pty", "spawn")}

#: Calls that create, rename, write or remove files and directories.
FS_CALLS = {("os", n) for n in ("open", "replace", "rename", "renames", "remove", "unlink",
                                "mkdir", "makedirs", "rmdir", "removedirs", "symlink",
                                "link", "truncate", "fdopen")} | {
    ("shutil", n) for n in ("copy", "copy2", "copyfile", "copytree", "move", "rmtree")}
FS_METHODS = {"write_bytes", "write_text", "mkdir", "unlink", "rename", "rmdir",
              "symlink_to", "hardlink_to", "save_as", "export", "save_model", "savez",
              "savez_compressed", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"}
#: Names whose import alone is a process call waiting to happen (``from subprocess import
#: run`` would hide the call from the attribute check above).
PROCESS_MODULES = {"subprocess", "pty"}
PROCESS_FUNCTIONS = {name for module, name in PROCESS_CALLS if module == "os"}

#: Where the runtime changes the file system, and why each name there is the node's
#: own: never a received string.
FS_ALLOWED = {
    # the spool: uuid4 names, "job-<int id>", "delivery-<int id>", .quarantine/<own name>
    ("dicom_node/spool.py", "Spool.__init__"),
    ("dicom_node/spool.py", "Spool._durable_write"),
    ("dicom_node/spool.py", "Spool.quarantine"),
    ("dicom_node/spool.py", "_fsync_dir"),
    ("dicom_node/spool.py", "_unlink_quietly"),
    # fixed names under the configured data directory
    ("dicom_node/jobs.py", "study_key_secret"),
    ("dicom_node/datadir.py", "DataDirLock.acquire"),
    ("dicom_node/node.py", "Node.__init__"),
    ("dicom_node/db.py", "make_engine"),  # the configured database's directory
    # the audit directory; files named node, worker-<this host's name> or admin
    ("dicom_node/audit.py", "open_trail"),
    # model artifacts: names from the model card and the command line (IT staff installing
    # or quantizing a model), never from received data
    ("model/card.py", "save_artifact"),
    ("model/card.py", "install"),
    ("model/card.py", "_atomic_write"),
    ("model/engine.py", "Engine._openvino_ir"),
    ("model/engine.py", "to_openvino"),  # a SavedModel in a private temporary directory
    ("model/quantize.py", "quantize"),
    # read only: the file pydicom read a source from (a spool name, or a path given on the
    # command line), for the pixel data it left there
    ("model/preprocess.py", "_read_native_frame"),
}


def _functions(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node of ``tree`` -> the qualified name of the function it is in."""
    owner: dict[ast.AST, str] = {}

    def walk(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                walk(child, [*scope, child.name])
            else:
                owner[child] = ".".join(scope) or "<module>"
                walk(child, scope)

    walk(tree, [])
    return owner


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` -- imports for annotations only, never executed."""
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _process_imports(node: ast.AST) -> list[str]:
    """What ``node`` imports that starts processes: ``import subprocess``, ``from os
    import system``, ``from subprocess import run``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in PROCESS_MODULES]
    if isinstance(node, ast.ImportFrom) and node.module in PROCESS_MODULES:
        return [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module == "os":
        return [f"os.{a.name}" for a in node.names if a.name in PROCESS_FUNCTIONS]
    return []


def _in_memory(tree: ast.AST, owner: dict[ast.AST, str]) -> set[tuple[str, str]]:
    """(function, name) of each name assigned a ``BytesIO()`` in that function."""
    return {(owner.get(node, ""), target.id) for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and _is_bytesio(node.value)
            for target in node.targets if isinstance(target, ast.Name)}


def _is_bytesio(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == "BytesIO")
        or (isinstance(node.func, ast.Attribute) and node.func.attr == "BytesIO"))


def _is_memory(arg: ast.AST, function: str, memory: set[tuple[str, str]]) -> bool:
    return _is_bytesio(arg) or (isinstance(arg, ast.Name) and (function, arg.id) in memory)


def _calls(kind: str, root: Path = ROOT, packages: tuple[str, ...] = RUNTIME
           ) -> list[tuple[str, str, int, str]]:
    """(file, function, line, call) of every call of ``kind`` in ``packages``."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            owner = _functions(tree)
            memory = _in_memory(tree, owner)
            rel = str(path.relative_to(root))
            if kind == "process":
                typing_only = {inner for node in ast.walk(tree) if _type_checking(node)
                               for statement in node.body  # type: ignore[attr-defined]
                               for inner in ast.walk(statement)}
                found += [(rel, owner.get(node, "<module>"), node.lineno, f"import {name}")
                          for node in ast.walk(tree) if node not in typing_only
                          for name in _process_imports(node)]
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = None
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    pair = (func.value.id, func.attr)
                    if kind == "process" and pair in PROCESS_CALLS:
                        name = ".".join(pair)
                    elif kind == "fs" and (pair in FS_CALLS or func.attr in FS_METHODS):
                        name = ".".join(pair)
                elif isinstance(func, ast.Attribute) and kind == "fs" \
                        and func.attr in FS_METHODS:
                    name = f"….{func.attr}"
                elif isinstance(func, ast.Name) and kind == "fs" and func.id == "open":
                    name = "open"
                if name is not None and name.endswith("save_as") and node.args \
                        and _is_memory(node.args[0], owner.get(node, ""), memory):
                    name = None  # pydicom writing to a BytesIO
                if name is not None:
                    found.append((rel, owner.get(node, "<module>"), node.lineno, name))
    return found


def test_the_node_starts_no_process_and_runs_no_shell() -> None:
    assert _calls("process") == []


def test_files_are_changed_only_where_their_names_are_the_nodes_own() -> None:
    found = _calls("fs")
    outside = [call for call in found if (call[0], call[1]) not in FS_ALLOWED]
    assert outside == [], "review these (and add them to FS_ALLOWED with the reason):"
    # Every reviewed place is still there: a scan that read nothing would pass above.
    assert FS_ALLOWED - {(call[0], call[1]) for call in found} == set()


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scanner itself, on a package of the mistakes it is there to catch."""
    package = tmp_path / "bad"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "store.py").write_text(
        "import os\n"
        "import subprocess\n"
        "from os import system\n"
        "from subprocess import run\n"
        "from io import BytesIO\n"
        "if TYPE_CHECKING:\n"
        "    import pty\n"
        "def handle(ds, root):\n"
        "    subprocess.run(['echo', ds.PatientName])\n"
        "    os.system(ds.StudyDescription)\n"
        "    (root / ds.SeriesDescription).write_bytes(b'')\n"
        "    open(ds.StudyDescription, 'w')\n"
        "    ds.save_as(root / ds.SOPInstanceUID)\n"
        "    buffer = BytesIO()\n"
        "    ds.save_as(buffer)\n")
    processes = _calls("process", tmp_path, ("bad",))
    assert sorted(call[3] for call in processes) == [
        "import os.system", "import subprocess", "import subprocess.run", "os.system",
        "subprocess.run"]
    files = _calls("fs", tmp_path, ("bad",))
    assert [(call[1], call[2], call[3]) for call in files] == [
        ("handle", 11, "….write_bytes"), ("handle", 12, "open"), ("handle", 13, "ds.save_as")]
