"""What the operator trusts: module prefixes, URI schemes and folders a run may use.

Configs, overrides and flow parameters come from whoever can fill in the Prefect UI's
run form, so nothing in them can widen what a run may reach. Trust comes only from the
operator, who controls the worker's machine and environment:

* environment variables of the worker or the deployment's job variables:
  ``BATON_ALLOWED_MODULES`` and ``BATON_ALLOWED_SCHEMES`` (comma-separated),
  ``BATON_CONFIG_ROOTS``, ``BATON_CHECKPOINT_ROOTS``, ``BATON_WORK_DIR_ROOTS`` and
  ``BATON_DATA_ROOTS`` (folders, separated by ``os.pathsep``);
* a ``[tool.baton]`` table in the project's ``pyproject.toml`` (keys ``allowed_modules``,
  ``allowed_schemes``, ``config_roots``, ``checkpoint_roots``, ``work_dir_roots``,
  ``data_roots``; relative folders are relative to the project);
* flags of a local ``baton run`` (``--allow-module``, ``--allow-scheme``), which the CLI
  turns into the environment variables of its own process.

The project folder is ``BATON_PROJECT_DIR`` or the current directory: configs passed by
path must live in its ``configs/`` (or a config root), relative paths resolve against it.
"""

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from baton.errors import MissingInputError, UntrustedInputError

# Module prefixes a dotted ``type`` may always use; the registry still checks the kind.
DEFAULT_MODULES = ("torch", "baton")

# Parts of torch that load, compile or run code, or reach the network or other
# processes. No component kind lives there, so a dotted type never resolves into them.
DENIED_MODULES = (
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.utils.cpp_extension",
    "torch.utils.data.datapipes",
    "torch.utils.model_zoo",
    "torch.distributed",
    "torch.multiprocessing",
    "torch.onnx",
    "torch.export",
    "torch.compiler",
    "torch.backends",
    "torch.cuda",
    "torch.library",
    "torch.ops",
    "torch.classes",
    "torch.testing",
    "torch.utils.benchmark",
    "torch.utils.tensorboard",
    "torch.serialization",
    "torch.storage",
)

# Where each setting lives, for refusals that tell the user where to go.
SETTINGS = {
    "allowed_modules": ("BATON_ALLOWED_MODULES", "--allow-module"),
    "allowed_schemes": ("BATON_ALLOWED_SCHEMES", "--allow-scheme"),
    "config_roots": ("BATON_CONFIG_ROOTS", None),
    "checkpoint_roots": ("BATON_CHECKPOINT_ROOTS", None),
    "work_dir_roots": ("BATON_WORK_DIR_ROOTS", None),
    "data_roots": ("BATON_DATA_ROOTS", None),
}

_PATH_SETTINGS = ("config_roots", "checkpoint_roots", "work_dir_roots", "data_roots")

# Config files are small; anything larger is refused before it is read.
MAX_CONFIG_FILE_BYTES = 1 << 20

# The longest file or folder name Linux file systems take (NAME_MAX), in bytes.
MAX_NAME_BYTES = 255


def where_to_set(setting: str) -> str:
    """One sentence naming where an operator sets ``setting``."""
    env, flag = SETTINGS[setting]
    places = [
        f"{env} in the worker's environment or the deployment's job variables",
        f"{setting} under [tool.baton] in the project's pyproject.toml",
    ]
    if flag:
        places.append(f"{flag} on a local `baton run`")
    return "an operator sets it with " + ", ".join(places[:-1]) + " or " + places[-1]


@dataclass(frozen=True)
class Trust:
    """The operator's allowances, read from the environment and the project's pyproject.

    Build it with :meth:`from_environment`; the default instance trusts nothing beyond
    baton's defaults, relative to the current directory.
    """

    project_dir: Path = field(default_factory=Path.cwd)
    allowed_modules: tuple[str, ...] = ()
    allowed_schemes: tuple[str, ...] = ()
    config_roots: tuple[Path, ...] = ()
    checkpoint_roots: tuple[Path, ...] = ()
    work_dir_roots: tuple[Path, ...] = ()
    data_roots: tuple[Path, ...] = ()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Trust":
        """The trust in effect for this process: environment plus ``[tool.baton]``."""
        environ = os.environ if environ is None else environ
        project = Path(environ.get("BATON_PROJECT_DIR") or Path.cwd()).resolve()
        table = _pyproject_table(project)
        values: dict[str, tuple] = {}
        for setting, (env, _) in SETTINGS.items():
            from_file = table.get(setting, [])
            if not isinstance(from_file, list) or not all(isinstance(v, str) for v in from_file):
                raise UntrustedInputError(
                    f"[tool.baton] {setting} in {project / 'pyproject.toml'} must be a list "
                    "of strings"
                )
            separator = os.pathsep if setting in _PATH_SETTINGS else ","
            from_env = [v.strip() for v in environ.get(env, "").split(separator)]
            items = [*from_file, *(v for v in from_env if v)]
            if setting in _PATH_SETTINGS:
                values[setting] = tuple(_root(project, v) for v in items)
            else:
                values[setting] = tuple(dict.fromkeys(items))
        return cls(project_dir=project, **values)

    # modules and schemes ---------------------------------------------------------------

    def module_prefixes(self) -> tuple[str, ...]:
        """Prefixes a dotted ``type`` may point into."""
        return (*DEFAULT_MODULES, *self.allowed_modules)

    def allows_module(self, dotted: str) -> bool:
        """True if ``dotted`` lies under an allowed prefix and no denied one."""
        if _under(dotted, DENIED_MODULES):
            return any(
                _under(dotted, (p,)) for p in self.allowed_modules if _under(p, DENIED_MODULES)
            )
        return _under(dotted, self.module_prefixes())

    def check_scheme(self, uri: str, what: str) -> None:
        """Refuse a URI whose scheme the operator did not allow (local files always pass)."""
        if "://" not in uri or uri.startswith("file://"):
            return
        scheme = uri.split("://", 1)[0]
        if scheme not in self.allowed_schemes:
            allowed = ", ".join(self.allowed_schemes) or "none besides local files"
            raise UntrustedInputError(
                f"{what} {uri!r}: scheme {scheme!r} is not allowed on this worker (allowed: "
                f"{allowed}); use a local file, or {where_to_set('allowed_schemes')}"
            )

    # paths ---------------------------------------------------------------------------

    def resolve(self, value: str | os.PathLike, what: str = "path") -> Path:
        """``value`` as an absolute path: relative ones are relative to the project.

        Raises:
            UntrustedInputError: ``value`` starts with ``~``, holds a NUL byte, or has a
                name longer than the file system takes (these would fail later, retried).
        """
        text = os.fspath(value)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if text.startswith("~"):
            raise UntrustedInputError(
                f"{what} {text!r} starts with '~'; give a path relative to the project or an "
                "absolute one"
            )
        if "\0" in text:
            raise UntrustedInputError(f"{what} {_short(text)} contains a NUL byte; remove it")
        for name in Path(text).parts:
            if len(os.fsencode(name)) > MAX_NAME_BYTES:
                raise UntrustedInputError(
                    f"{what} {_short(text)} has a name of {len(os.fsencode(name))} bytes, "
                    f"longer than {MAX_NAME_BYTES} (NAME_MAX); use shorter names"
                )
        path = Path(text)
        return path if path.is_absolute() else self.project_dir / path

    def check_work_dir(self, value: str) -> Path:
        """The absolute folder of all experiments for a configured ``work_dir``.

        Relative paths stay inside the project (never the project folder itself);
        absolute ones must lie under the project or an operator's work-dir root.
        """
        path = self.resolve(value, "work_dir")
        if ".." in Path(value).parts:
            raise UntrustedInputError(f"work_dir {value!r} must not contain '..'")
        real = Path(os.path.realpath(path))
        if real == Path(os.path.realpath(self.project_dir)):
            raise UntrustedInputError(
                f"work_dir {value!r} is the project folder: experiments would be written "
                "among its source files; use a sub-folder such as 'work_dirs'"
            )
        roots = (self.project_dir, *self.work_dir_roots)
        if not _inside(real, roots):
            raise UntrustedInputError(
                f"work_dir {value!r} is outside the project ({self.project_dir}) and the "
                f"work-dir roots; use a relative path, or {where_to_set('work_dir_roots')}"
            )
        return path

    def check_checkpoint(self, uri: str, *, experiment_dir: Path | None, what: str) -> str:
        """Refuse a checkpoint outside the experiment and the operator's roots.

        A local file must be a regular file inside ``experiment_dir`` or a checkpoint
        root (after following links); a URI must use an allowed scheme. Returns the URI
        to load (local paths made absolute).

        Raises:
            UntrustedInputError: With the reason and what to do instead.
        """
        if not isinstance(uri, str) or not uri.strip():
            raise UntrustedInputError(f"{what} must be a path or URI, got {uri!r}")
        if "://" in uri and not uri.startswith("file://"):
            self.check_scheme(uri, what)
            return uri
        path = self.resolve(uri, what)
        real = Path(os.path.realpath(path))
        roots = [*self.checkpoint_roots]
        if experiment_dir is not None:
            roots.insert(0, Path(os.path.realpath(self.resolve(experiment_dir))))
        if not _inside(real, roots):
            where = f"the experiment folder ({experiment_dir})" if experiment_dir else ""
            raise UntrustedInputError(
                f"{what} {uri!r} is outside {where or 'every checkpoint root'}"
                f"{' and the checkpoint roots' if where else ''}; copy the file into the "
                f"experiment's checkpoints/ folder, or {where_to_set('checkpoint_roots')}"
            )
        check_regular_file(real, what)
        return str(path)

    def check_config_path(self, value: str) -> Path:
        """A config named by a flow parameter: a YAML file in ``configs/`` or a config root."""
        path = self.resolve(value, "config")
        if path.suffix not in (".yaml", ".yml"):
            raise UntrustedInputError(
                f"config {value!r} is not a .yaml file; name a file in configs/, or pass the "
                "config as YAML text or a mapping"
            )
        real = Path(os.path.realpath(path))
        roots = (Path(os.path.realpath(self.project_dir / "configs")), *self.config_roots)
        if not _inside(real, roots):
            raise UntrustedInputError(
                f"config {value!r} is outside the project's configs/ folder and the config "
                f"roots; put it in configs/, pass it as YAML text, or {where_to_set('config_roots')}"
            )
        check_regular_file(real, "config", max_bytes=MAX_CONFIG_FILE_BYTES)
        return real

    def check_data_path(self, value: str, what: str) -> Path:
        """A data folder or file a dataset reads: inside the project or a data root."""
        path = self.resolve(value, what)
        real = Path(os.path.realpath(path))
        if not _inside(real, (self.project_dir, *self.data_roots)):
            raise UntrustedInputError(
                f"{what} {value!r} is outside the project and the data roots; "
                f"{where_to_set('data_roots')}"
            )
        return path


def check_regular_file(path: Path, what: str, *, max_bytes: int | None = None) -> None:
    """Refuse anything but an existing regular file (no devices, FIFOs or folders)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MissingInputError(f"{what} {str(path)!r} does not exist") from None
    except ValueError as err:  # os.stat's "embedded null byte"
        raise UntrustedInputError(f"{what} {_short(str(path))} contains a NUL byte") from err
    except OSError as err:
        raise UntrustedInputError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise UntrustedInputError(f"{what} {str(path)!r} is {kind}; name a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UntrustedInputError(
            f"{what} {str(path)!r} is {info.st_size} bytes, more than {max_bytes}"
        )


def _pyproject_table(project: Path) -> dict:
    path = project / "pyproject.toml"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UntrustedInputError(f"{path} cannot be read: {err}") from err
    table = data.get("tool", {}).get("baton", {})
    unknown = sorted(set(table) - set(SETTINGS))
    if unknown:
        raise UntrustedInputError(
            f"[tool.baton] in {path} has unknown key(s) {unknown}; known: {', '.join(SETTINGS)}"
        )
    return table


def _root(project: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.realpath(path if path.is_absolute() else project / path))


def _short(text: str) -> str:
    """``repr(text)`` cut to 60 characters, to quote a bad value in a message."""
    quoted = repr(text)
    return quoted if len(quoted) <= 60 else quoted[:57] + "..."


def _under(dotted: str, prefixes: Iterable[str]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
