"""The modelling code of an exported folder, generated from this package's own source files.

The network exists once, in ``moda_lightning``; an exported folder carries copies of the modules it
needs, laid flat next to ``modeling_moda.py`` (transformers loads remote code from one flat folder
and follows ``from .name import ...`` lines to find the files to copy). What is copied is found by
reading imports, starting from the two transformers entry points
(``moda_lightning/export/templates/``): every ``moda_lightning`` or ``moda_kernels`` module they
reach, at module level or inside a function, becomes a file of the folder, and its import lines
are rewritten to point at the copies (``moda_lightning.attention.base`` -> ``.attention_base``).

Two kinds of import stay as they are:

- the fused Triton kernels (:data:`EXTERNAL_KERNELS`), which the folder takes from an installed
  ``moda_kernels`` at run time, on CUDA, when it is there. Their imports must sit inside a
  function, and are wrapped in ``try``: transformers scans every import of a remote-code file
  outside ``try`` blocks and refuses to load a file naming a package that is not installed;
- the standard library, torch and transformers.

Anything else (a new third-party package, ``import moda_lightning.x`` forms, a star import, a
kernel imported at module level) is a :class:`BundleError`, raised at export time, so a change to
the model that the folder could not carry fails the export and its tests instead of the user's
``from_pretrained``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PACKAGES = ("moda_lightning", "moda_kernels")
"""Top-level packages whose modules are copied into the folder."""

EXTERNAL_KERNELS = ("moda_kernels.moda_attn.function", "moda_kernels.norm_rope")
"""Modules (and everything under them) that are not copied: the Triton kernels, used from an
installed ``moda_kernels`` on CUDA. They import Triton at module level, which a CPU-only
environment lacks, so copying them would make transformers refuse the folder there."""

ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
"""Third-party packages the folder's code may import: what a transformers user has."""

TEMPLATES = "moda_lightning.export.templates"
"""Package of the transformers entry points; its modules keep their own names in the folder."""

ENTRY_POINTS = (f"{TEMPLATES}.configuration_moda", f"{TEMPLATES}.modeling_moda")

_MISSING_KERNEL = (
    "{module} is a fused CUDA kernel of the moda_kernels package, which is not installed; install "
    "moda-kernels (kernels/ of the moda-lightning repository) or run the model on the CPU"
)


class BundleError(ValueError):
    """An import in the model's source that an exported folder cannot carry."""


def is_external(module: str) -> bool:
    """Whether ``module`` is one of the kernels the folder uses from an installed ``moda_kernels``."""
    return any(module == k or module.startswith(k + ".") for k in EXTERNAL_KERNELS)


def flat_name(module: str) -> str:
    """The folder's file (without ``.py``) for a bundled module.

    ``moda_lightning.attention.base`` -> ``attention_base``; ``moda_kernels.moda_attn.checks`` ->
    ``moda_kernels_moda_attn_checks`` (the prefix keeps the two packages apart); the templates
    keep their names, which ``auto_map`` names.
    """
    if module.startswith(TEMPLATES + "."):
        return module[len(TEMPLATES) + 1 :]
    top, *rest = module.split(".")
    if top not in BUNDLED_PACKAGES:
        raise BundleError(f"{module} is not a module of {' or '.join(BUNDLED_PACKAGES)}, so it is not bundled")
    if not rest:
        raise BundleError(
            f"an import from the package root {top} cannot be bundled (it would pull in the whole package); "
            f"import the name from the module that defines it"
        )
    return "_".join(rest) if top == "moda_lightning" else "_".join([top, *rest])


def _package_root(top: str) -> Path:
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(f"the {top} package is not installed, so its source cannot be bundled")
    return Path(next(iter(spec.submodule_search_locations)))


def source_file(module: str) -> Path | None:
    """The ``.py`` file of a module of the bundled packages (a package's ``__init__.py``), or None."""
    top, *rest = module.split(".")
    if top not in BUNDLED_PACKAGES:
        return None
    base = _package_root(top).joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if rest and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def is_submodule(package: str, name: str) -> bool:
    """Whether ``from package import name`` imports the module ``package.name``, as Python decides it:
    only if ``package``'s ``__init__`` does not bind ``name`` itself (``moda_lightning.generation``
    re-exports the function ``generate`` over its module ``generate``) and that module exists."""
    if source_file(f"{package}.{name}") is None:
        return False
    init = source_file(package)
    if init is None or init.name != "__init__.py":
        return False
    return name not in _bound_names(ast.parse(init.read_text(encoding="utf-8")), package)


def _bound_names(tree: ast.Module, package: str) -> set[str]:
    """Names the top level of a package's ``__init__`` binds, leaving out its imports of its own
    submodules (``from package import sub``), which bind the submodule."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and _absolute(node, package, True) != package:
            names.update(a.asname or a.name for a in node.names)
    return names


@dataclass(frozen=True)
class _Import:
    node: ast.Import | ast.ImportFrom
    in_function: bool


def _imports(tree: ast.Module) -> list[_Import]:
    """Every import statement of ``tree``, with whether it runs inside a function body."""
    found: list[_Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(_Import(child, in_function))
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inside)

    visit(tree, False)
    return found


def _dynamic_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``importlib.import_module("moda_...")`` calls with a literal name: imports the AST walk of
    import statements would miss."""
    calls = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        target = node.args[0].value
        if name == "import_module" and isinstance(target, str) and target.split(".")[0] in BUNDLED_PACKAGES:
            calls.append((node.lineno, target))
    return calls


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names, resolving ``from .x import y`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts) - 1:
        raise BundleError(f"{module}: relative import beyond the top-level package")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _aliases(names: Iterable[ast.alias]) -> str:
    return ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in names)


@dataclass
class Rewritten:
    """One module's source with its imports pointed at the folder, and the modules it needs copied."""

    source: str
    needs: list[str]


def rewrite_imports(
    source: str, module: str, *, is_package: bool = False, is_submodule: Callable[[str, str], bool] = is_submodule
) -> Rewritten:
    """Rewrite the imports of ``module``'s ``source`` for a flat folder.

    ``from moda_lightning.a.b import x`` becomes ``from .a_b import x``; a name that is itself a
    module (``from moda_lightning.attention import sdpa``) becomes ``from . import attention_sdpa
    as sdpa``, preceded by a ``from .attention_sdpa import __name__ as _`` line: transformers only
    copies files that some file imports in the ``from .name import`` form. Imports of
    :data:`EXTERNAL_KERNELS` are wrapped in ``try`` with an error that says what to install.

    Args:
        source: the module's text.
        module: its dotted name, for relative imports and messages.
        is_package: whether it is a package's ``__init__.py`` (relative imports start there).
        is_submodule: whether ``from package import name`` imports a module (tests pass their own).

    Raises:
        BundleError: for an import a folder needing torch and transformers only cannot carry.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    needs: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []  # (first line, last line, replacement lines), 1-based

    for lineno, target in _dynamic_imports(tree):
        if not is_external(target):
            raise BundleError(
                f"{module}:{lineno} imports {target!r} through importlib; write it as an import statement "
                "so that the export can copy it"
            )

    for found in _imports(tree):
        node = found.node
        where = f"{module}:{node.lineno}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in BUNDLED_PACKAGES:
                    package, _, name = alias.name.rpartition(".")
                    raise BundleError(
                        f"{where}: `import {alias.name}` cannot be bundled; write "
                        f"`from {package or top} import {name}` or import the names it uses"
                    )
                _check_third_party(top, where)
            continue
        target = _absolute(node, module, is_package)
        top = target.split(".")[0]
        if top not in BUNDLED_PACKAGES:
            _check_third_party(top, where)
            continue
        if any(a.name == "*" for a in node.names):
            raise BundleError(f"{where}: `from {target} import *` cannot be bundled; import the names it uses")
        indent = " " * node.col_offset
        _check_alone_on_its_lines(lines, node, where)
        if is_external(target):
            if not found.in_function:
                raise BundleError(
                    f"{where}: {target} is a fused kernel the folder takes from an installed moda_kernels; "
                    "import it inside the function that uses it, so that the folder loads without it"
                )
            statement = f"from {target} import {_aliases(node.names)}"
            message = textwrap.wrap(_MISSING_KERNEL.format(module=target), 90, drop_whitespace=False)
            edits.append((node.lineno, node.end_lineno, [
                f"{indent}try:\n",
                f"{indent}    {statement}\n",
                f"{indent}except ImportError as err:  # the folder runs without moda_kernels, on the reference paths\n",
                f"{indent}    raise ImportError(\n",
                *[f"{indent}        {piece!r}\n" for piece in message],
                f"{indent}    ) from err\n",
            ]))  # fmt: skip
            continue
        submodules = [a for a in node.names if is_submodule(target, a.name)]
        attributes = [a for a in node.names if a not in submodules]
        replacement = []
        if attributes:
            needs.append(target)
            replacement.append(f"{indent}from .{flat_name(target)} import {_aliases(attributes)}\n")
        for alias in submodules:
            sub = f"{target}.{alias.name}"
            needs.append(sub)
            flat = flat_name(sub)
            # `from . import x` alone would not be copied by transformers: it follows `from .x import` lines
            replacement.append(f"{indent}from .{flat} import __name__ as _  # noqa: F401\n")
            replacement.append(f"{indent}from . import {flat} as {alias.asname or alias.name}  # noqa: F401\n")
        edits.append((node.lineno, node.end_lineno, replacement))

    for first, last, replacement in sorted(edits, reverse=True):
        lines[first - 1 : last] = replacement
    return Rewritten("".join(lines), needs)


def _check_third_party(top: str, where: str) -> None:
    if top and top not in sys.stdlib_module_names and top not in ALLOWED_PACKAGES and top != "__future__":
        raise BundleError(
            f"{where} imports {top}, which an exported folder cannot require: it needs "
            f"{' and '.join(sorted(ALLOWED_PACKAGES))} only. Import it inside a function behind an availability "
            "check, or keep it out of the modules the network imports"
        )


def _check_alone_on_its_lines(lines: list[str], node: ast.stmt, where: str) -> None:
    before = lines[node.lineno - 1][: node.col_offset]
    after = lines[node.end_lineno - 1][node.end_col_offset :].strip()
    if before.strip() or (after and not after.startswith("#")):
        raise BundleError(f"{where}: an import that shares its line with another statement cannot be rewritten")


@dataclass
class Bundle:
    """The folder's code: file name -> text, and the source module each file was made from."""

    files: dict[str, str]
    sources: dict[str, str]

    def write(self, folder: Path) -> list[str]:
        """Write every file into ``folder``; returns the file names."""
        for name, text in self.files.items():
            (folder / name).write_text(text, encoding="utf-8")
        return sorted(self.files)


def build_bundle(entry_points: Iterable[str] = ENTRY_POINTS) -> Bundle:
    """Copy and rewrite every module the entry points reach through their imports.

    Raises:
        BundleError: for an import that cannot be carried, or two modules that would share a file name.
    """
    version = _package_version()
    pending, seen = list(entry_points), set()
    files: dict[str, str] = {}
    sources: dict[str, str] = {}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = source_file(module)
        if path is None:
            raise BundleError(f"{module} is imported by the model but has no source file to copy")
        rewritten = rewrite_imports(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py")
        name = flat_name(module) + ".py"
        if name in files:
            raise BundleError(f"{sources[name]} and {module} would both be copied to {name}; rename one of them")
        shown = path.relative_to(_package_root(module.split(".")[0]).parent).as_posix()
        header = (
            f"# Generated by `moda export` from {shown} (moda-lightning {version}), with its imports\n"
            "# pointed at the other files of this folder. Edit the source, not this copy.\n"
        )
        files[name] = header + rewritten.source
        sources[name] = module
        pending.extend(rewritten.needs)
    return Bundle(files, sources)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moda-lightning")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "source checkout"
