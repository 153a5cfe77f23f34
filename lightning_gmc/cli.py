"""The ``lightning-gmc`` command line.

::

    lightning-gmc demo                        # GMC vs plain DDP on digits, 2 CPU processes (a clone)
    lightning-gmc fit digits/gmc_noniid       # a bundled LightningCLI config (a clone)
    lightning-gmc fit --list                  # the bundled configs

``demo`` and ``fit`` run the examples of the lightning-gmc repository (``examples/demo.py``,
``examples/train.py`` and ``examples/configs/``). They are not part of the installed package: run the
command inside a clone of the repository (or pass ``--repo PATH``), with the ``examples`` extra
installed. Each subcommand is one row of :data:`COMMANDS`; a row names a function here or a module of
the package (``"lightning_gmc.plan:main"``) that is imported only when its subcommand runs.

This module is the command line's own output, so it writes to stdout and stderr with ``print``; the
library itself logs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "Command", "RepositoryNotFound", "find_repository", "main"]

#: a subcommand: its arguments after the subcommand's name -> exit code
Handler = Callable[[list[str]], int]

#: the repository folders ``demo`` and ``fit`` need
_EXAMPLE_FILES = ("examples/demo.py", "examples/train.py", "examples/configs")
#: imports the examples need beyond lightning_gmc's own: (module, distribution)
_EXAMPLE_IMPORTS = (
    ("sklearn", "scikit-learn"),
    ("torchmetrics", "torchmetrics"),
    ("torchvision", "torchvision"),
    ("jsonargparse", "jsonargparse[signatures]"),
)
_REPO_ENV = "LIGHTNING_GMC_REPO"


class RepositoryNotFound(RuntimeError):
    """No clone of the repository (with ``examples/``) where the command looked."""


@dataclass(frozen=True)
class Command:
    """One subcommand: a one-line help, and either a handler or ``"package.module:function"``.

    A target module that does not exist in this version makes the subcommand say so (exit code 2)
    instead of failing with an import error.
    """

    help: str
    handler: Handler | None = None
    target: str | None = None

    def resolve(self) -> Handler | None:
        """The handler; None when the target module is not part of this version."""
        if self.handler is not None:
            return self.handler
        assert self.target is not None, "a Command has a handler or a target"
        module_name, _, function = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                return None
            raise  # the module exists but one of its own imports is missing: show that
        handler: Handler = getattr(module, function)
        return handler


def _version() -> str:
    try:
        return importlib.metadata.version("lightning-gmc")
    except importlib.metadata.PackageNotFoundError:
        from lightning_gmc import __version__

        return __version__


def _clone_command() -> str:
    """``git clone <address>`` with the address from the installed package's metadata (pyproject's
    project URLs), so that the command line never disagrees with the package's own record."""
    try:
        urls = importlib.metadata.metadata("lightning-gmc").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "source":
            return f"git clone {url.strip()}"
    return "git clone <the lightning-gmc repository>   # its address: pip show -v lightning-gmc"


def _package_parent() -> Path:
    """The folder holding the imported ``lightning_gmc``: the clone itself for an editable install or
    ``PYTHONPATH``, ``site-packages`` for a wheel."""
    return Path(__file__).resolve().parents[1]


def _is_repository(path: Path) -> bool:
    return all((path / name).exists() for name in _EXAMPLE_FILES)


def find_repository(explicit: Path | None = None, cwd: Path | None = None) -> Path:
    """The clone whose ``examples/`` to run: ``explicit`` (``--repo``) or ``$LIGHTNING_GMC_REPO`` if
    given; otherwise the clone this package was imported from (an editable install or ``PYTHONPATH``),
    then the working directory and its parents.

    Raises:
        RepositoryNotFound: no clone there; the message says where to get one.
    """
    given = explicit if explicit is not None else os.environ.get(_REPO_ENV)
    if given:
        path = Path(given).expanduser().resolve()
        if _is_repository(path):
            return path
        raise RepositoryNotFound(
            f"{path} is not a clone of lightning-gmc: it has no {', '.join(_EXAMPLE_FILES)}"
        )
    here = (cwd or Path.cwd()).resolve()
    candidates = [_package_parent(), here, *here.parents]
    for candidate in candidates:
        if _is_repository(candidate):
            return candidate
    raise RepositoryNotFound(
        "the examples and their configs (examples/demo.py, examples/train.py, examples/configs/) live in "
        "the lightning-gmc repository, not in the installed package. Get them with\n"
        f"    {_clone_command()}\n"
        '    pip install "lightning-gmc[examples]"   # or, in the clone: pip install -e ".[examples]"\n'
        f"and run this command inside the clone, or pass --repo PATH (or set {_REPO_ENV})."
    )


def _missing_example_imports() -> list[str]:
    return [dist for module, dist in _EXAMPLE_IMPORTS if importlib.util.find_spec(module) is None]


def _run_example(script: str, arguments: Sequence[str], repo_option: Path | None) -> int:
    """Run ``examples/<script>`` of the clone with this interpreter; its exit code."""
    try:
        repo = find_repository(repo_option)
    except RepositoryNotFound as err:
        print(f"lightning-gmc: {err}", file=sys.stderr)
        return 2
    missing = _missing_example_imports()
    if missing:
        quoted = " ".join(f'"{name}"' for name in missing)
        print(
            f"lightning-gmc: the examples need {', '.join(missing)}, which are not installed; install the "
            f'examples extra: pip install -e "{repo}[examples]" (or pip install {quoted})',
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, str(repo / "examples" / script), *arguments]
    return subprocess.run(command, check=False).returncode


def _repo_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--repo",
        type=Path,
        default=None,
        help=f"the clone of lightning-gmc to run the examples from (default: ${_REPO_ENV}, the clone this "
        "package is imported from, or the working directory and its parents)",
    )
    return parser


def demo(arguments: list[str]) -> int:
    """``lightning-gmc demo [--repo PATH] [demo options]``: ``examples/demo.py`` of the clone."""
    parser = _repo_parser(
        "lightning-gmc demo",
        "Train the digits CNN on 2 CPU processes with GMC and with plain DDP and print accuracy, bytes and "
        "time (about two minutes). Other options go to examples/demo.py (--epochs N, --quick, "
        "--no-progress, --json FILE). Needs a clone of the repository.",
    )
    options, rest = parser.parse_known_args(arguments)
    return _run_example("demo.py", rest, options.repo)


def _config_path(repo: Path, name: str) -> Path:
    """A config given as a path, or as a name under ``examples/configs`` (``digits/gmc_noniid``)."""
    given = Path(name)
    if given.exists():
        return given
    bundled = repo / "examples" / "configs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.exists():
        return bundled
    raise FileNotFoundError(f"no config {name!r}: neither a file nor one of `lightning-gmc fit --list`")


def _bundled_configs(repo: Path) -> list[str]:
    root = repo / "examples" / "configs"
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def fit(arguments: list[str]) -> int:
    """``lightning-gmc fit CONFIG [--repo PATH] [LightningCLI overrides]``: ``examples/train.py fit``."""
    parser = _repo_parser(
        "lightning-gmc fit",
        "Train with a LightningCLI config of the repository (examples/configs/), e.g. digits/gmc_noniid "
        "(offline, 2 CPU processes) or table1/cifar10_iid_resnet20bn_gmc; then test and print the test "
        "accuracy. Further arguments are LightningCLI overrides (--trainer.max_epochs=5, "
        "--trainer.strategy.density=0.05, ...). Needs a clone of the repository.",
    )
    parser.add_argument("config", nargs="?", help="a path, or a name under examples/configs/ without .yaml")
    parser.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    options, overrides = parser.parse_known_args(arguments)
    if options.list or options.config is None:
        try:
            repo = find_repository(options.repo)
        except RepositoryNotFound as err:
            print(f"lightning-gmc: {err}", file=sys.stderr)
            return 2
        if not options.list:
            parser.print_usage(sys.stderr)
            print("lightning-gmc fit: name a config; the bundled ones are:", file=sys.stderr)
        out = sys.stdout if options.list else sys.stderr
        print("\n".join(_bundled_configs(repo)), file=out)
        return 0 if options.list else 2
    try:
        config = _config_path(find_repository(options.repo), options.config)
    except (RepositoryNotFound, FileNotFoundError) as err:
        print(f"lightning-gmc: {err}", file=sys.stderr)
        return 2
    return _run_example("train.py", ["fit", "--config", str(config), *overrides], options.repo)


#: the subcommands, in the order ``--help`` lists them
COMMANDS: dict[str, Command] = {
    "demo": Command("GMC vs plain DDP on digits, 2 CPU processes, offline (needs a clone)", handler=demo),
    "fit": Command("train with a bundled LightningCLI config (needs a clone)", handler=fit),
    "plan": Command(
        "will compression pay? each setting's predicted step on a cluster", target="lightning_gmc.plan:main"
    ),
}

_EPILOG = """\
demo and fit run the examples of the lightning-gmc repository (examples/demo.py, examples/train.py,
examples/configs/). They are not in the installed package: clone the repository, install its
examples extra (pip install -e ".[examples]"), and run the command inside the clone or pass --repo.
`lightning-gmc COMMAND --help` shows a command's options."""


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<6} {command.help}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="lightning-gmc",
        description="Communication-compressed data-parallel training for PyTorch Lightning "
        f"(GMC, GMC+ and their baselines).\n\ncommands:\n{listing}",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lightning-gmc {_version()}")
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS)
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-gmc`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    handler = COMMANDS[args.command].resolve()
    if handler is None:
        print(
            f"lightning-gmc: `{args.command}` is not available in this version ({_version()}); "
            f"available: {', '.join(name for name, c in COMMANDS.items() if c.resolve() is not None)}",
            file=sys.stderr,
        )
        return 2
    return handler(list(args.arguments))


if __name__ == "__main__":
    raise SystemExit(main())
