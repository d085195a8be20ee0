"""Issue 20's smaller holes: what the Prefect UI's run form could still slip past the
checks. Each input is refused at validation as a permanent error naming the bad value,
and nothing is written; values shown in artifacts cannot inject markdown."""

import errno
import os

import pytest

from baton.checkpoint import committed, io
from baton.checkpoint.ref import CheckpointName
from baton.checkpoint.store import CheckpointStore
from baton.config import load_config
from baton.config.parsing import MAX_NESTING
from baton.data.datasets import ImageFolder
from baton.errors import CheckpointError, ConfigError, UntrustedInputError
from baton.experiment import check_experiment_name
from baton.flows.cli import main
from baton.markdown import code_block, inline_code, table_cell, text
from baton.tasks._common import PERMANENT_ERRORS, artifact_key
from baton.tasks.report import summarize
from baton.tasks.state import RunState

from ..baton.image_folders import make_image_folder
from ..flows.conftest import small_config
from .payloads import config_file

INJECTION = "\n```\n# injected\n[click](http://evil.example)\n\n| a | b |\n"


def _outside_every_fence_and_span(markdown: str) -> str:
    """The markdown with its code blocks and code spans removed (CommonMark's rules for
    fences and spans of backtick runs), i.e. what renders as markdown."""
    kept, fence = [], None
    for line in markdown.split("\n"):
        stripped = line.lstrip(" ")
        run = len(stripped) - len(stripped.lstrip("`"))
        if fence is None and run >= 3:
            fence = run
        elif fence is not None and run >= fence and not stripped.strip("`"):
            fence = None
        elif fence is None:
            kept.append(line)
    rest = "\n".join(kept)
    out, i = [], 0
    while i < len(rest):
        if rest[i] == "`":
            run = len(rest[i:]) - len(rest[i:].lstrip("`"))
            end = rest.find("`" * run, i + run)
            while end != -1 and rest[end + run : end + run + 1] == "`":
                end = rest.find("`" * run, end + run + 1)
            if end != -1 and "\n\n" not in rest[i:end]:
                i = end + run
                continue
        out.append(rest[i])
        i += 1
    return "".join(out)


# 1. artifacts ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [INJECTION, "a``b`", "`", "x\n\n# h", "a|b\\|c"])
def test_markdown_helpers_never_let_a_value_out(value):
    for markdown in (code_block(value, "yaml"), "- " + inline_code(value)):
        assert "# injected" not in _outside_every_fence_and_span(markdown)
        assert "[click]" not in _outside_every_fence_and_span(markdown)
    cell = table_cell(value)
    assert "\n" not in cell and "|" not in cell.replace("\\|", "")
    assert "\n" not in text(value) and "[" not in text(value).replace("\\[", "")


def test_a_work_dir_cannot_inject_markdown_into_the_summary(tmp_path):
    cfg = small_config(tmp_path / f"wd{INJECTION}", name="inject")
    state = RunState(experiment_name="inject", max_epochs=1, max_iters=8, epoch_length=8)
    markdown = summarize.fn(cfg, state, 0.0)
    assert "```" in markdown  # the config is shown, in a fence
    rendered = _outside_every_fence_and_span(markdown)
    assert "# injected" not in rendered and "[click]" not in rendered, markdown


def test_publish_evaluation_escapes_the_checkpoint_and_metric_names(monkeypatch):
    from baton.flows import evaluate

    published = {}
    monkeypatch.setattr(evaluate, "create_markdown_artifact", lambda **kw: published.update(kw))
    evaluate.publish_evaluation.fn("exp", f"a.pth{INJECTION}", {"val/x | y\n# z": 1.0})
    rendered = _outside_every_fence_and_span(published["markdown"])
    assert "# injected" not in rendered and "[click]" not in rendered
    assert "\n# z" not in published["markdown"]
    table = [line for line in published["markdown"].splitlines() if line.startswith("|")]
    assert all(line.replace("\\|", "").count("|") == 3 for line in table), table


def test_artifact_keys_are_unique_per_experiment_and_valid():
    names = ["digits_mlp", "Digits.MLP", "digits-mlp", "digits-mlp\n", "x" * 128]
    keys = [artifact_key(name, "summary") for name in names]
    assert len(set(keys)) == len(keys), keys
    assert all(
        k == k.lower() and set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for k in keys
    )
    assert keys[2].startswith("digits-mlp-") and keys[2].endswith("-summary")
    assert artifact_key("digits-mlp", "summary") == keys[2]  # stable


# 2. anchored names ------------------------------------------------------------------


def test_an_experiment_name_with_a_trailing_newline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="experiment_name 'digits-mlp\\\\n' is not allowed"):
        check_experiment_name("digits-mlp\n")
    with pytest.raises(ConfigError, match="experiment_name"):
        load_config(small_config(tmp_path / "wd"), {"experiment_name": "digits-mlp\n"})
    assert not (tmp_path / "wd").exists()


def test_a_checkpoint_file_name_with_a_trailing_newline_is_not_a_checkpoint_name():
    assert CheckpointName.parse("epoch_0003.pth") == CheckpointName.for_epoch(3)
    for name in ("epoch_0003.pth\n", "L2-epoch_0003.pth\n", "L2\n-epoch_0003.pth"):
        assert CheckpointName.parse(name) is None, name


# 3. override depth ------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 300, 600, 2000])
def test_an_override_key_deeper_than_the_limit_is_a_config_error(tmp_path, depth):
    key = ".".join(["a"] * depth)
    with pytest.raises(ConfigError, match=f"override key .* deeper than {MAX_NESTING} levels"):
        load_config(small_config(tmp_path / "wd"), [f"{key}=1"])


# 4. NUL bytes, long names, compile ------------------------------------------------


@pytest.mark.parametrize(
    "overrides, refusal",
    [
        ({"work_dir": "wd\0x"}, "work_dir .* NUL"),
        ({"work_dir": "wd/" + "n" * 300}, "work_dir .* longer than 255"),
        ({"experiment_name": "e" * 128, "work_dir": "w" * 256}, "longer than 255"),
    ],
)
def test_work_dir_with_a_nul_or_an_over_long_name_is_refused(tmp_path, overrides, refusal):
    cfg = small_config(tmp_path / "wd")
    with pytest.raises(ConfigError, match=refusal):
        load_config(cfg, overrides)
    with pytest.raises(ConfigError, match=refusal.replace("work_dir", "resume checkpoint")):
        load_config(cfg, {"resume": overrides["work_dir"]})


@pytest.mark.parametrize(
    "path, refusal", [("configs/x\0.yaml", "NUL"), ("configs/" + "c" * 300 + ".yaml", "255")]
)
def test_a_config_path_with_a_nul_or_an_over_long_name_is_refused(path, refusal):
    with pytest.raises(UntrustedInputError, match=f"config .*{refusal}"):
        load_config(path, from_parameter=True)
    with pytest.raises(ConfigError, match=f"config .*({refusal}|File name too long)"):
        load_config(path)  # a local `baton run`


def test_a_compile_target_the_model_lacks_is_reported_with_the_rest(tmp_path):
    cfg = small_config(tmp_path / "wd")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, {"compile": {"target": "doesnotexist"}, "train.max_epochs": 0})
    assert "compile.target" in str(err.value) and "doesnotexist" in str(err.value)
    assert "train.max_epochs" in str(err.value)
    for target in ("training", "net", "zero_grad"):
        with pytest.raises(ConfigError, match="compile.target"):
            load_config(cfg, {"compile": {"target": target}})
    assert load_config(cfg, {"compile": {"target": "forward"}}).compile.target == "forward"


# 5. a work dir that is not an experiments folder -----------------------------------


def test_the_project_folder_is_not_a_work_dir(tmp_path):
    with pytest.raises(ConfigError, match="work_dir '.' is the project folder"):
        load_config(small_config(tmp_path / "wd"), {"work_dir": ".", "experiment_name": "baton"})


@pytest.mark.parametrize("work_dir", ["baton", "baton/checkpoint", "tests/security"])
def test_a_python_package_is_not_a_work_dir(tmp_path, work_dir):
    """work_dir: baton with a fresh experiment name would write baton/<name>/ among the
    engine's source files."""
    with pytest.raises(ConfigError, match=f"work_dir '{work_dir}' is inside the Python package"):
        load_config(small_config(tmp_path / "wd"), {"work_dir": work_dir})


def test_a_folder_with_only_the_retention_record_is_an_experiment(tmp_path):
    """The retention record is written under the lock before the first checkpoint: a run
    that stopped then (or a task in a fresh process) still finds its experiment."""
    cfg = small_config(tmp_path / "wd", name="recorded")
    folder = tmp_path / "wd" / "recorded"
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text("{}")
    load_config(cfg)


def test_an_existing_folder_that_is_not_an_experiment_is_refused(tmp_path):
    cfg = small_config(tmp_path / "wd", name="taken")
    folder = tmp_path / "wd" / "taken"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an experiment.*another work_dir or experiment_name"):
        load_config(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "notes.txt").unlink()  # an empty folder is a fresh experiment
    load_config(cfg)
    (folder / "manifest.json").write_text("{}")  # so is one with a manifest
    (folder / "metrics.jsonl").write_text("")
    load_config(cfg)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "wd" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="is not a folder \\(a link is not followed\\)"):
        load_config(cfg, {"experiment_name": "linked"})


# 6. image folders ---------------------------------------------------------------------


def test_an_image_folder_never_follows_a_link_out_of_the_data_roots(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data" / "images")
    secret = make_image_folder(tmp_path / "secret", classes=("s",))
    monkeypatch.setenv("BATON_DATA_ROOTS", str(tmp_path / "data"))
    ImageFolder(str(data))
    (data / "z").symlink_to(secret / "s", target_is_directory=True)
    with pytest.raises(UntrustedInputError, match="outside the project and the data roots"):
        ImageFolder(str(data))
    (data / "z").unlink()
    (data / "a" / "leak.png").symlink_to(secret / "s" / "000.png")
    with pytest.raises(UntrustedInputError, match="leak.png.*outside"):
        ImageFolder(str(data))


# 7. the denylist follows where a class is defined ------------------------------------


def test_a_class_defined_in_a_denied_module_is_refused_under_any_name(tmp_path, capsys):
    override = "train_data.dataset={type: torch.utils.data.MapDataPipe}"
    with pytest.raises(ConfigError, match=r"defined in torch\.utils\.data\.datapipes"):
        load_config(small_config(tmp_path / "wd"), [override])
    assert main(["validate", str(config_file(tmp_path)), "--set", override]) == 2
    assert "defined in torch.utils.data.datapipes" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()


# 8. a manifest that cannot be read just now --------------------------------------------


def test_an_io_error_reading_the_manifest_is_transient_and_changes_nothing(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "exp")
    refs = []
    for epoch in (1, 2):
        path = store.target(str(CheckpointName.for_epoch(epoch)))
        size, digest = io.save({"meta": {"epoch": epoch, "iter": epoch}}, str(path))
        refs.append(store.commit(str(path), epoch=epoch, iter=epoch, size=size, sha256=digest))
    store.start_lineage(parent=refs[0], reason="branch", run="run-2")
    committed.compact(store._files, committed.load(store._files))
    before = {p.name: p.read_bytes() for p in store.root.iterdir() if p.is_file()}
    committed._CACHE.clear()  # as a new process would

    real_read = os.read

    def failing_read(fd, n):
        if os.readlink(f"/proc/self/fd/{fd}") == str(store.manifest_path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", failing_read)
    for attempt in (store.list, lambda: store.lock().__enter__()):
        with pytest.raises(CheckpointError, match="manifest.json.*could not be read") as err:
            attempt()
        assert not isinstance(err.value, PERMANENT_ERRORS)
    monkeypatch.setattr(os, "read", real_read)
    after = {p.name: p.read_bytes() for p in store.root.iterdir() if p.is_file()}
    assert after == {**before, ".lock": b""}  # the lock's file, and no .corrupt-* copies
    lineages = store.lineages()
    assert [(lin.reason, lin.run) for lin in lineages] == [("first", None), ("branch", "run-2")]
    assert lineages[1].parent == refs[0]
