"""Filename schemes of load_checkpoint: paths, file://, fsspec, http(s), model zoos."""

import http.server
import threading

import fsspec
import pytest
import torch

from baton import CheckpointError, CheckpointNotFoundError, SingleDeviceStrategy
from baton.checkpoint import loaders, register_open_mmlab, register_scheme

from ..conftest import TinyNet


@pytest.fixture
def strategy(work_dir):
    s = SingleDeviceStrategy(work_dir=str(work_dir), env_kwargs={"randomness": {"seed": 0}})
    s.prepare(TinyNet())
    return s


@pytest.fixture
def weights_bytes(tmp_path):
    source = TinyNet()
    path = tmp_path / "src.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    return source, path.read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("BATON_CACHE_DIR", str(folder))
    return folder / "checkpoints"


def _same(model, source):
    return all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_home_relative_path(strategy, weights_bytes, tmp_path, monkeypatch):
    source, data = weights_bytes
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.pth").write_bytes(data)
    strategy.load_checkpoint("~/w.pth", strict=True)
    assert _same(strategy.model, source)


def test_file_uri(strategy, weights_bytes, tmp_path):
    source, data = weights_bytes
    (tmp_path / "f.pth").write_bytes(data)
    strategy.load_checkpoint(f"file://{tmp_path / 'f.pth'}", strict=True)
    assert _same(strategy.model, source)


def test_fsspec_memory_protocol(strategy, weights_bytes):
    source, data = weights_bytes
    fs = fsspec.filesystem("memory")
    fs.pipe("/ckpts/m.pth", data)
    strategy.load_checkpoint("memory://ckpts/m.pth", strict=True)
    assert _same(strategy.model, source)


def test_save_to_fsspec_and_resume(strategy):
    ref = strategy.save_checkpoint("memory://saved/epoch_0001.pth")
    assert fsspec.filesystem("memory").exists("/saved/epoch_0001.pth")
    strategy.resume(ref.uri)


def test_unknown_protocol(strategy):
    with pytest.raises(CheckpointError, match="scheme 'nosuch' is neither registered"):
        strategy.load_checkpoint("nosuch://x/y.pth")


def test_register_scheme(strategy, weights_bytes, tmp_path):
    source, data = weights_bytes
    (tmp_path / "reg.pth").write_bytes(data)
    register_scheme(
        "mine://", lambda name, loc: torch.load(tmp_path / "reg.pth", map_location=loc), force=True
    )
    strategy.load_checkpoint("mine://anything", strict=True)
    assert _same(strategy.model, source)
    with pytest.raises(KeyError, match="already registered"):
        register_scheme("mine://", lambda n, m: None)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    lie_about_length = False
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        if self.path.endswith("missing.pth"):
            self.send_error(404)
            return
        self.send_response(200)
        length = len(self.payload) * (2 if self.lie_about_length else 1)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(weights_bytes):
    _Handler.payload = weights_bytes[1]
    _Handler.lie_about_length = False
    _Handler.hits = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_download_is_cached(strategy, weights_bytes, server, cache):
    source, _ = weights_bytes
    strategy.load_checkpoint(f"{server}/zoo/model.pth", strict=True)
    strategy.load_checkpoint(f"{server}/zoo/model.pth", strict=True)
    assert _same(strategy.model, source)
    assert _Handler.hits == 1
    assert [p.name.endswith("-model.pth") for p in cache.iterdir()] == [True]


def test_interrupted_download_leaves_no_file(strategy, server, cache):
    _Handler.lie_about_length = True
    with pytest.raises(CheckpointError, match="half way|stopped after"):
        strategy.load_checkpoint(f"{server}/zoo/cut.pth")
    assert list(cache.iterdir()) == []


def test_http_404(strategy, server, cache):
    with pytest.raises(CheckpointNotFoundError, match="404"):
        strategy.load_checkpoint(f"{server}/missing.pth")


def test_open_mmlab_names(strategy, weights_bytes, server, cache):
    source, _ = weights_bytes
    with pytest.raises(
        CheckpointNotFoundError, match="unknown open-mmlab model 'nope'.*resnet50_v1c"
    ):
        strategy.load_checkpoint("open-mmlab://nope")
    register_open_mmlab("tiny_net", f"{server}/zoo/tiny.pth")
    strategy.load_checkpoint("open-mmlab://tiny_net", strict=True)
    assert _same(strategy.model, source)


def test_torchvision_without_torchvision(strategy, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision":
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(CheckpointError, match="needs torchvision"):
        strategy.load_checkpoint("torchvision://resnet50")


def test_registered_schemes_are_listed():
    assert {"file://", "http://", "https://", "open-mmlab://", "torchvision://"} <= set(
        loaders.registered_schemes()
    )
