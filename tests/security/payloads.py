"""Hostile inputs, each with the trace it would leave if it worked.

A payload is a list of overrides (what the Prefect UI's run form and ``--set`` send);
``effect()`` says whether it did anything (a marker file, a request to a loopback
listener, a folder created). Every entry point must refuse each one, tell the user why,
and leave no trace.
"""

import contextlib
import http.server
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..flows.conftest import small_config


@dataclass
class Payload:
    name: str
    overrides: list[str]
    effect: Callable[[], bool]
    refusal: str  # a regex the refusal must match


class Listener:
    """An HTTP server on 127.0.0.1 that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                listener.requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def listening() -> Iterator[Listener]:
    listener = Listener()
    try:
        yield listener
    finally:
        listener.close()


class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def evil_pickle(path: Path, marker: Path) -> Path:
    """A pickle that creates ``marker`` when unpickled."""
    path.write_bytes(pickle.dumps(_RunsACommand(f"touch {marker}")))
    return path


def payloads(tmp: Path, listener: Listener) -> list[Payload]:
    """One payload per class of attack, their traces under ``tmp``."""
    marker = tmp / "owned"
    evil = evil_pickle(tmp / "evil.pkl", tmp / "unpickled")
    far_work_dir = Path("/var/tmp") / f"baton-attack-{os.getpid()}"
    url = f"http://127.0.0.1:{listener.port}/weights.pth"
    return [
        Payload(
            "self-widened allowlist",
            [
                "allowed_modules=[subprocess]",
                f'train_data.dataset={{type: subprocess.run, args: "touch {marker}", shell: true}}',
            ],
            marker.exists,
            r"allowed_modules is not a config key",
        ),
        Payload(
            "command through a torch function",
            [f'model={{type: torch.utils.collect_env.run, command: "touch {marker}"}}'],
            marker.exists,
            r"collect_env.run' is a function, not an nn.Module subclass",
        ),
        Payload(
            "unsafe unpickle through a loader function",
            [f"train_data.dataset={{type: torch.load, f: {evil}, weights_only: false}}"],
            (tmp / "unpickled").exists,
            r"torch.load' is a function, not a map-style Dataset subclass",
        ),
        Payload(
            "file write",
            [f"model={{type: torch.save, obj: pwned, f: {marker}}}"],
            marker.exists,
            r"torch.save' is a function, not an nn.Module subclass",
        ),
        Payload(
            "nested component where no slot is",
            [
                "model={type: MLP, in_features: 8, num_classes: 3, "
                f'hidden: {{type: torch.utils.collect_env.run, command: "touch {marker}"}}}}'
            ],
            marker.exists,
            r"model.hidden.*not a slot",
        ),
        Payload(
            "self-widened schemes",
            ["allowed_schemes=[http]", f"load_from={{uri: '{url}'}}"],
            lambda: bool(listener.requests),
            r"allowed_schemes is not a config key",
        ),
        Payload(
            "request to a loopback listener",
            [f"load_from={{uri: '{url}'}}"],
            lambda: bool(listener.requests),
            r"scheme 'http' is not allowed on this worker",
        ),
        Payload(
            "device file as resume checkpoint",
            ["resume=/dev/zero"],
            lambda: False,
            r"resume checkpoint '/dev/zero' is outside the experiment folder",
        ),
        Payload(
            "'~' work_dir",
            [f"work_dir=~/baton-attack-{tmp.name}"],
            lambda: (Path.home() / f"baton-attack-{tmp.name}").exists() or Path("~").exists(),
            r"work_dir.*starts with '~'",
        ),
        Payload(
            "absolute work_dir outside the roots",
            [f"work_dir={far_work_dir}"],
            far_work_dir.exists,
            r"work_dir.*outside the project.*BATON_WORK_DIR_ROOTS",
        ),
    ]


NAMES = [
    "self-widened allowlist",
    "command through a torch function",
    "unsafe unpickle through a loader function",
    "file write",
    "nested component where no slot is",
    "self-widened schemes",
    "request to a loopback listener",
    "device file as resume checkpoint",
    "'~' work_dir",
    "absolute work_dir outside the roots",
]


def alias_bomb(levels: int = 9) -> str:
    """About 300 bytes that expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def config_file(tmp: Path, name: str = "pipeline.yaml") -> Path:
    """A small valid pipeline as a YAML file (work dir and experiment under ``tmp``)."""
    path = tmp / name
    path.write_text(yaml.safe_dump(small_config(tmp / "wd", name="target")))
    return path
