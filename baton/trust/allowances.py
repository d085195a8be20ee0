"""What the operator trusts: module prefixes, URI schemes and folders a run may use.

Configs, overrides and flow parameters come from whoever can fill in the Prefect UI's
run form, so nothing in them can widen what a run may reach. Trust comes only from the
operator, who controls the worker's machine and environment:

* environment variables of the worker (a run of a deployment gets the worker's environment):
  ``BATON_ALLOWED_MODULES`` and ``BATON_ALLOWED_SCHEMES`` (comma-separated),
  ``BATON_CONFIG_ROOTS``, ``BATON_CHECKPOINT_ROOTS``, ``BATON_WORK_DIR_ROOTS`` and
  ``BATON_DATA_ROOTS`` (folders, separated by ``os.pathsep``);
* a ``[tool.baton]`` table in the project's ``pyproject.toml`` (keys ``allowed_modules``,
  ``allowed_schemes``, ``config_roots``, ``checkpoint_roots``, ``work_dir_roots``,
  ``data_roots``; relative folders are relative to the project);
* flags of a local ``baton run`` (``--allow-module``, ``--allow-scheme``), which the CLI
  turns into the environment variables of its own process.

A run's own job variables never reach this module: the work pool's base job template
(``deployments/pool-template.json``) admits none, and the flow refuses a run that carries
some (``baton.flows.pool``).

**Deployments own their experiments.** A flow run of a deployment writes its experiments
only in that deployment's folder: ``work_dir`` under ``[tool.baton.deployments."<flow>/<name>"]``
in pyproject.toml, else ``<deployments_work_dir>/<flow>/<name>`` (``BATON_DEPLOYMENTS_WORK_DIR``
or ``deployments_work_dir`` under ``[tool.baton]``, by default the project's
``work_dirs/deployments``). The flow learns its deployment from the server and names it in
``BATON_DEPLOYMENT`` for its own process (:func:`deployment_environment`); the same table's
``checkpoint_roots`` are the other folders its runs may read checkpoints from.

The project folder is ``BATON_PROJECT_DIR`` or the current directory: configs passed by
path must live in its ``configs/`` (or a config root), relative paths resolve against it.
The operator's quotas live beside these settings, in ``[tool.baton.quotas]`` and
``BATON_MAX_*`` variables (:mod:`baton.trust.quotas`), and so does the tracker a run's
metrics go to (``[tool.baton.tracking]``, ``BATON_MLFLOW_TRACKING_URI``:
``baton.tracking.settings``).

**Read once per run.** The environment and pyproject.toml are read together
(:class:`OperatorSettings`), and a :class:`Trust` keeps what it was read from, so the quotas
of the same reading follow from it (``Quotas.of``). Code that has the trust passes it
down; a run's entry holds it for the code that has not (:func:`held_trust`: the flows'
:func:`deployment_environment`, ``baton.run.pipeline.run``), where every
:meth:`Trust.from_environment` returns the run's, read at its first use.
"""

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from baton.errors import MissingInputError, UntrustedInputError, short_repr

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

# The deployment a flow run belongs to ("<flow>/<deployment>"), set by the flow for its own
# process from what the server says (never from the run's parameters or job variables).
DEPLOYMENT_VARIABLE = "BATON_DEPLOYMENT"
# Where a deployment without a folder of its own writes: <this>/<flow>/<deployment>.
DEPLOYMENTS_WORK_DIR_VARIABLE = "BATON_DEPLOYMENTS_WORK_DIR"
DEFAULT_DEPLOYMENTS_WORK_DIR = "work_dirs/deployments"
# Keys of a [tool.baton.deployments."<flow>/<deployment>"] table.
DEPLOYMENT_KEYS = ("work_dir", "checkpoint_roots")
# Sub-tables of [tool.baton] (quotas: baton.trust.quotas; deployments: below; tracking:
# baton.tracking.settings), and a folder.
SUBTABLES = ("quotas", "deployments", "tracking")
_OTHER_KEYS = (*SUBTABLES, "deployments_work_dir")
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,127}")

# Config files are small; anything larger is refused before it is read.
MAX_CONFIG_FILE_BYTES = 1 << 20

# The longest file or folder name Linux file systems take (NAME_MAX), in bytes.
MAX_NAME_BYTES = 255

# The name ending of a sharded checkpoint's folder (``baton.checkpoint.sharded.SUFFIX``,
# which trust sits below; a test holds the two equal): such a folder is a checkpoint
# where one may be named, what it holds is checked by the checkpoint package.
SHARDED_CHECKPOINT_SUFFIX = ".dcp"


def where_to_set(setting: str) -> str:
    """One sentence naming where an operator sets ``setting``."""
    env, flag = SETTINGS[setting]
    places = [
        f"{env} in the worker's environment",
        f"{setting} under [tool.baton] in the project's pyproject.toml",
    ]
    if flag:
        places.append(f"{flag} on a local `baton run`")
    return "an operator sets it with " + ", ".join(places[:-1]) + " or " + places[-1]


@dataclass(frozen=True, eq=False)
class OperatorSettings:
    """What the operator set, as read at one moment: the process's ``BATON_*`` environment
    variables and ``[tool.baton]`` of the project's pyproject.toml. :class:`Trust` and the
    quotas (``baton.trust.quotas.Quotas.of``) are derived from one reading."""

    project: Path
    table: dict
    environ: dict[str, str]

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> "OperatorSettings":
        """Read the settings now: ``environ`` (default: the process's) and the project's
        pyproject.toml.

        Raises:
            UntrustedInputError: pyproject.toml cannot be read, or ``[tool.baton]`` has an
                unknown key or a malformed deployments table.
        """
        environ = os.environ if environ is None else environ
        project = project_dir(environ)
        variables = {k: v for k, v in environ.items() if k.startswith("BATON_")}
        return cls(project=project, table=_pyproject_table(project), environ=variables)

    def subtable(self, name: str) -> dict:
        """The ``[tool.baton.<name>]`` table (see :func:`pyproject_subtable`)."""
        return _subtable(self.table, self.project, name)


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
    # The deployment this process runs a flow run of, and the one folder it may write.
    deployment: str | None = None
    deployment_work_dir: Path | None = None
    # What it was read from (the quotas of the same reading follow from it); None in a
    # Trust made by hand.
    settings: OperatorSettings | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Trust":
        """The trust in effect for this process: environment plus ``[tool.baton]``.

        Inside a run that holds its trust (:func:`held_trust`), the run's, read once at
        its first use; with ``environ`` given, always read from it.
        """
        if environ is None and _held is not None:
            return _held.trust()
        return cls.of(OperatorSettings.read(environ))

    @classmethod
    def of(cls, settings: OperatorSettings) -> "Trust":
        """The trust the operator's ``settings`` give.

        Raises:
            UntrustedInputError: A setting of the wrong type, or deployment folders that
                overlap.
        """
        project, table, environ = settings.project, settings.table, settings.environ
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
        deployment = environ.get(DEPLOYMENT_VARIABLE) or None
        if deployment is None:
            return cls(project_dir=project, settings=settings, **values)
        folders = _deployment_folders(project, table, environ)
        folder = folders.get(deployment) or _default_folder(project, table, environ, deployment)
        entry = table.get("deployments", {}).get(deployment, {})
        values["checkpoint_roots"] += tuple(
            _root(project, v) for v in entry.get("checkpoint_roots", [])
        )
        values["work_dir_roots"] += (folder,)
        return cls(
            project_dir=project,
            deployment=deployment,
            deployment_work_dir=folder,
            settings=settings,
            **values,
        )

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
            raise UntrustedInputError(f"{what} {short_repr(text)} contains a NUL byte; remove it")
        for name in Path(text).parts:
            if len(os.fsencode(name)) > MAX_NAME_BYTES:
                raise UntrustedInputError(
                    f"{what} {short_repr(text)} has a name of {len(os.fsencode(name))} bytes, "
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
        package = _enclosing_package(real, Path(os.path.realpath(self.project_dir)))
        if package is not None:
            raise UntrustedInputError(
                f"work_dir {value!r} is inside the Python package {str(package)!r}: experiments "
                "would be written among its source files; use a sub-folder such as 'work_dirs'"
            )
        if self.deployment_work_dir is not None:
            if real != Path(os.path.realpath(self.deployment_work_dir)):
                raise UntrustedInputError(
                    f"work_dir {value!r}: runs of deployment {self.deployment!r} keep their "
                    f"experiments in {self.deployment_work_dir} (the operator's setting); leave "
                    "work_dir empty"
                )
            return real
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
        root (after following links), or a sharded checkpoint there: a real folder (the
        name given is not a link) whose name ends in ``.dcp``; a URI must use an allowed
        scheme. Returns the URI to load (local paths made absolute).

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
        if not _is_sharded_folder(path):
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
        raise UntrustedInputError(f"{what} {short_repr(str(path))} contains a NUL byte") from err
    except OSError as err:
        raise UntrustedInputError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise UntrustedInputError(f"{what} {str(path)!r} is {kind}; name a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UntrustedInputError(
            f"{what} {str(path)!r} is {info.st_size} bytes, more than {max_bytes}"
        )


def _is_sharded_folder(path: Path) -> bool:
    """A real folder (not a link to one) named as a sharded checkpoint."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and path.name.endswith(SHARDED_CHECKPOINT_SUFFIX)


def project_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The project folder: ``BATON_PROJECT_DIR`` or the current directory."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("BATON_PROJECT_DIR") or Path.cwd()).resolve()


def pyproject_subtable(project: Path, name: str) -> dict:
    """The ``[tool.baton.<name>]`` table of the project's pyproject.toml (one of
    ``SUBTABLES``); empty if there is none.

    Raises:
        UntrustedInputError: The file cannot be read, or ``name`` is not a table.
    """
    return _subtable(_pyproject_table(project), project, name)


def _subtable(table: Mapping, project: Path, name: str) -> dict:
    found = table.get(name, {})
    if not isinstance(found, dict):
        raise UntrustedInputError(
            f"[tool.baton] {name} in {project / 'pyproject.toml'} must be a table "
            f"([tool.baton.{name}])"
        )
    return found


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
    known = (*SETTINGS, *_OTHER_KEYS)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UntrustedInputError(
            f"[tool.baton] in {path} has unknown key(s) {unknown}; known: {', '.join(known)}"
        )
    _check_deployments_table(path, table)
    return table


def _check_deployments_table(path: Path, table: Mapping) -> None:
    """Refuse a malformed ``[tool.baton.deployments]`` or ``deployments_work_dir``."""
    where = f"[tool.baton] in {path}"
    if not isinstance(table.get("deployments_work_dir", ""), str):
        raise UntrustedInputError(f"{where}: deployments_work_dir must be a folder (a string)")
    deployments = table.get("deployments", {})
    if not isinstance(deployments, dict):
        raise UntrustedInputError(f"{where}: deployments must be a table of deployments")
    for name, entry in deployments.items():
        check_deployment_name(name)
        if not isinstance(entry, dict) or set(entry) - set(DEPLOYMENT_KEYS):
            raise UntrustedInputError(
                f"{where}: deployments.{name!r} must be a table with keys "
                f"{', '.join(DEPLOYMENT_KEYS)}"
            )
        roots = entry.get("checkpoint_roots", [])
        if not isinstance(entry.get("work_dir", ""), str) or not (
            isinstance(roots, list) and all(isinstance(r, str) for r in roots)
        ):
            raise UntrustedInputError(
                f"{where}: deployments.{name!r}: work_dir is a folder and checkpoint_roots a "
                "list of folders"
            )


def check_deployment_name(name: str) -> str:
    """``name`` if it is ``<flow>/<deployment>`` with two plain parts, else an error: the
    parts become folder names."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 2 or not all(_NAME_PART.fullmatch(p) and ".." not in p for p in parts):
        raise UntrustedInputError(
            f"deployment {name!r} cannot have a folder: name deployments '<flow>/<deployment>' "
            "with letters, digits, spaces, '.', '_' or '-'"
        )
    return name


def _deployments_base(project: Path, table: Mapping, environ: Mapping) -> Path:
    """The folder deployments without one of their own write under."""
    base = environ.get(DEPLOYMENTS_WORK_DIR_VARIABLE) or table.get(
        "deployments_work_dir", DEFAULT_DEPLOYMENTS_WORK_DIR
    )
    return _root(project, base)


def _default_folder(project: Path, table: Mapping, environ: Mapping, deployment: str) -> Path:
    flow, name = check_deployment_name(deployment).split("/")
    return _deployments_base(project, table, environ) / flow / name


def _deployment_folders(project: Path, table: Mapping, environ: Mapping) -> dict[str, Path]:
    """Each configured deployment's folder; refuses folders that overlap, since a deployment
    could then write another's experiments."""
    folders = {
        name: _root(project, entry["work_dir"])
        for name, entry in table.get("deployments", {}).items()
        if entry.get("work_dir")
    }
    named = [*folders.items(), ("deployments_work_dir", _deployments_base(project, table, environ))]
    for index, (first, a) in enumerate(named):
        for second, b in named[index + 1 :]:
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise UntrustedInputError(
                    f"the folders of {first!r} ({a}) and {second!r} ({b}) overlap, so one "
                    "could write the other's experiments; give each deployment a folder of "
                    "its own under [tool.baton.deployments] in pyproject.toml"
                )
    return folders


class _Hold:
    """The trust a run holds: read at its first use, then the same for the whole run."""

    def __init__(self, trust: Trust | None) -> None:
        self._trust = trust

    def trust(self) -> Trust:
        if self._trust is None:  # a failed read is not kept: the next use reads again
            self._trust = Trust.of(OperatorSettings.read())
        return self._trust


# The hold of the run in progress in this process, like the environment it stands for.
_held: _Hold | None = None


@contextlib.contextmanager
def held_trust(trust: Trust | None = None, *, fresh: bool = False) -> Iterator[None]:
    """Hold the operator's trust while the block runs (a run's entry): every
    :meth:`Trust.from_environment` and ``Quotas.from_environment`` of this process inside
    returns what was read at the first use (or ``trust``), so a run reads pyproject.toml
    once. A block inside another holds the outer one's, unless ``fresh`` (a deployment's
    flow run, whose deployment changes what is read) or given its own ``trust``.
    """
    global _held
    outer = _held
    if outer is None or fresh or trust is not None:
        _held = _Hold(trust)
    try:
        yield
    finally:
        _held = outer


def holds_trust() -> bool:
    """Whether a run of this process holds its trust now (:func:`held_trust`)."""
    return _held is not None


@contextlib.contextmanager
def deployment_environment(deployment: str | None) -> Iterator[None]:
    """A flow run's entry: name ``deployment`` in this process's environment (and its
    children's) while the block runs, so that trust applies its folder, and hold the
    trust read with it for the run (:func:`held_trust`)."""
    if deployment is None:
        with held_trust(fresh=True):
            yield
        return
    check_deployment_name(deployment)
    before = os.environ.get(DEPLOYMENT_VARIABLE)
    os.environ[DEPLOYMENT_VARIABLE] = deployment
    try:
        with held_trust(fresh=True):
            yield
    finally:
        if before is None:
            os.environ.pop(DEPLOYMENT_VARIABLE, None)
        else:
            os.environ[DEPLOYMENT_VARIABLE] = before


def _root(project: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.realpath(path if path.is_absolute() else project / path))


def _enclosing_package(path: Path, project: Path) -> Path | None:
    """The outermost folder between ``project`` (excluded) and ``path`` (included) that is a
    Python package (holds ``__init__.py``), or None; only folders inside the project count."""
    if not path.is_relative_to(project):
        return None
    folder = project
    for part in path.relative_to(project).parts:
        folder = folder / part
        if (folder / "__init__.py").exists():
            return folder
    return None


def _under(dotted: str, prefixes: Iterable[str]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
