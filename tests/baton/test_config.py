"""Pipeline configs: examples validate, every mistake is reported with its key and line."""

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from baton import ConfigError
from baton.config import PipelineConfig, Resume, apply_overrides, load_config
from baton.run import pipeline as pl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))

BASE = textwrap.dedent(
    """\
    experiment_name: base
    model: {type: MLP, in_features: 8, num_classes: 3}
    train_data:
      dataset: {type: SyntheticClassification}
      batch_size: 32
    optim_wrapper:
      optimizer: {type: SGD, lr: 0.1}
    train:
      max_epochs: 2
    """
)


def base() -> dict:
    return yaml.safe_load(BASE)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert load_config(cfg.to_yaml()) == cfg  # the resolved dump loads back to the same


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"digits_mlp.yaml", "digits_cnn.yaml"}


def test_defaults_are_filled_in():
    cfg = load_config(base())
    assert cfg.randomness.seed == 0 and cfg.randomness.deterministic
    assert cfg.checkpoint.keep_last == 3 and cfg.resume == "auto"
    assert cfg.loss == {"type": "CrossEntropyLoss"}


@pytest.mark.parametrize(
    ("text", "auto", "never", "checkpoint"),
    [
        ("auto", True, False, None),
        ("never", False, True, None),
        (
            "work_dirs/exp/checkpoints/epoch_0001.pth",
            False,
            False,
            "work_dirs/exp/checkpoints/epoch_0001.pth",
        ),
    ],
)
def test_resume_is_one_typed_value_that_keeps_its_text(text, auto, never, checkpoint):
    """What ``resume`` says is read in one place, its type; the config (and its hash, and
    every checkpoint's record of it) holds the text it was given."""
    cfg = PipelineConfig.model_validate({**base(), "resume": text})
    assert type(cfg.resume) is Resume and cfg.resume == text
    assert (cfg.resume.auto, cfg.resume.never, cfg.resume.checkpoint) == (auto, never, checkpoint)
    assert cfg.model_dump(mode="json")["resume"] == text
    assert type(PipelineConfig.model_validate(base()).resume) is Resume  # the default too
    assert PipelineConfig.model_json_schema()["properties"]["resume"]["type"] == "string"


def test_hashes():
    a = load_config(base())
    longer = load_config(base(), ["train.max_epochs=5"])
    wider = load_config(base(), ["model.hidden=[32]"])
    assert a.config_hash != longer.config_hash
    assert a.architecture_hash == longer.architecture_hash
    assert a.architecture_hash != wider.architecture_hash


def test_overrides_are_typed():
    cfg = load_config(
        base(),
        [
            "train.max_epochs=5",
            "optim_wrapper.optimizer.lr=0.01",
            "optim_wrapper.optimizer.momentum=0.9",
            "train_data.shuffle=false",
            "model.hidden=[4, 4]",
        ],
    )
    assert cfg.train.max_epochs == 5
    assert cfg.optim_wrapper.optimizer["lr"] == 0.01
    assert cfg.train_data.shuffle is False
    assert cfg.model["hidden"] == [4, 4]


def test_override_mapping_and_list_index():
    data = base()
    data["param_scheduler"] = [{"type": "StepLR", "step_size": 1}]
    out = apply_overrides(data, {"param_scheduler.0.step_size": 3})
    assert out["param_scheduler"][0]["step_size"] == 3
    assert data["param_scheduler"][0]["step_size"] == 1  # input untouched


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("no_equals_sign", "must look like key.path=value"),
        ("param_scheduler.5.end=3", "is not an index"),
        ("train.max_epochs.deeper=3", "is not a mapping"),
        (".=3", "empty"),
    ],
)
def test_bad_overrides(override, message):
    data = base()
    data["param_scheduler"] = []
    with pytest.raises(ConfigError, match=message):
        load_config(data, [override])


def test_override_with_wrong_type_is_reported_by_schema():
    with pytest.raises(ConfigError, match="train.max_epochs.*valid integer"):
        load_config(base(), ["train.max_epochs=five"])


# The battery: each bad config, and what its message must say.
BAD = [
    ("missing model", lambda d: d.pop("model"), r"model: required key is missing"),
    (
        "missing name",
        lambda d: d.pop("experiment_name"),
        r"experiment_name: required key is missing",
    ),
    ("unknown top key", lambda d: d.update(modle={}), r"modle.*unknown key; did you mean 'model'"),
    (
        "unknown nested key",
        lambda d: d["train"].update(max_epoch=3),
        r"train.max_epoch.*did you mean 'max_epochs'",
    ),
    (
        "negative epochs",
        lambda d: d["train"].update(max_epochs=-1),
        r"train.max_epochs.*greater than or equal to 1; found -1",
    ),
    (
        "huge epochs",
        lambda d: d["train"].update(max_epochs=10**9),
        r"train.max_epochs.*less than or equal to 100000",
    ),
    (
        "zero batch",
        lambda d: d["train_data"].update(batch_size=0),
        r"train_data.batch_size.*greater than or equal to 1",
    ),
    (
        "huge batch",
        lambda d: d["train_data"].update(batch_size=10**8),
        r"train_data.batch_size.*less than or equal",
    ),
    (
        "string batch",
        lambda d: d["train_data"].update(batch_size="big"),
        r"train_data.batch_size.*valid integer.*found 'big'",
    ),
    (
        "both horizons",
        lambda d: d["train"].update(max_iters=10),
        r"train.*exactly one of max_epochs and max_iters",
    ),
    (
        "no horizon",
        lambda d: d["train"].pop("max_epochs"),
        r"train.*exactly one of max_epochs and max_iters",
    ),
    (
        "component without type",
        lambda d: d.update(model={"in_features": 8}),
        r"model.*needs a 'type'",
    ),
    (
        "unknown short type",
        lambda d: d["model"].update(type="Transformer9000"),
        r"model.type.*unknown model type 'Transformer9000'",
    ),
    (
        "os.system",
        lambda d: d["model"].update(type="os.system"),
        r"model.type.*'os.system' is outside the allowed modules",
    ),
    (
        "builtins.eval",
        lambda d: (
            d["loss"].update(type="builtins.eval")
            if "loss" in d
            else d.update(loss={"type": "builtins.eval"})
        ),
        r"loss.type.*'builtins.eval' is outside",
    ),
    (
        "subprocess",
        lambda d: d["train_data"]["dataset"].update(type="subprocess.Popen"),
        r"train_data.dataset.type.*outside the allowed modules",
    ),
    (
        "torch path that does not exist",
        lambda d: d["model"].update(type="torch.nn.NoSuchLayer"),
        r"module 'torch.nn' has no 'NoSuchLayer'",
    ),
    (
        "unimportable allowed module",
        lambda d: d["model"].update(type="baton.nosuchpkg.Net"),
        r"cannot import module 'baton.nosuchpkg'",
    ),
    (
        "bad model argument",
        lambda d: d["model"].update(width=3),
        r"model.width.*MLP has no argument 'width'; it accepts in_features",
    ),
    (
        "missing model argument",
        lambda d: d["model"].pop("num_classes"),
        r"model.num_classes.*MLP needs argument 'num_classes'",
    ),
    (
        "bad optimizer argument",
        lambda d: d["optim_wrapper"]["optimizer"].update(lrr=1),
        r"optim_wrapper.optimizer.lrr.*SGD has no argument 'lrr'",
    ),
    (
        "bad wrapper type",
        lambda d: d["optim_wrapper"].update(type="Deepspeed"),
        r"optim_wrapper.type.*'OptimWrapper' or 'AmpOptimWrapper'",
    ),
    (
        "zero accumulation",
        lambda d: d["optim_wrapper"].update(accumulative_counts=0),
        r"accumulative_counts.*greater than or equal to 1",
    ),
    (
        "unknown scheduler",
        lambda d: d.update(param_scheduler=[{"type": "Cosine"}]),
        r"param_scheduler.0.type.*unknown scheduler type 'Cosine'.*CosineAnnealingLR",
    ),
    (
        "bad scheduler argument",
        lambda d: d.update(param_scheduler=[{"type": "StepLR", "steps": 1}]),
        r"param_scheduler.0.steps.*StepLR has no argument 'steps'",
    ),
    (
        "convert iter-based",
        lambda d: d.update(
            param_scheduler=[{"type": "LinearLR", "by_epoch": False, "convert_to_iter_based": True}]
        ),
        r"only an epoch-based scheduler",
    ),
    (
        "scheduler not a list",
        lambda d: d.update(param_scheduler={"type": "StepLR"}),
        r"param_scheduler.*valid list",
    ),
    (
        "keep_best without metric",
        lambda d: d.update(checkpoint={"keep_best": 2}),
        r"checkpoint.keep_best.*needs best_metric",
    ),
    (
        "best metric prefix",
        lambda d: d.update(checkpoint={"keep_best": 1, "best_metric": "accuracy"}),
        r"best_metric must start with 'val/'",
    ),
    (
        "best metric without val data",
        lambda d: d.update(checkpoint={"keep_best": 1, "best_metric": "val/accuracy"}),
        r"val/accuracy needs val_data",
    ),
    (
        "bad best mode",
        lambda d: d.update(checkpoint={"best_mode": "up"}),
        r"checkpoint.best_mode.*'max' or 'min'",
    ),
    (
        "path traversal name",
        lambda d: d.update(experiment_name="../../etc"),
        r"experiment_name.*is not allowed",
    ),
    (
        "slash in name",
        lambda d: d.update(experiment_name="a/b"),
        r"experiment_name.*no path separators",
    ),
    (
        "work_dir traversal",
        lambda d: d.update(work_dir="runs/../../etc"),
        r"work_dir.*must not contain '..'",
    ),
    (
        "seed negative",
        lambda d: d.update(randomness={"seed": -5}),
        r"randomness.seed.*greater than or equal to 0",
    ),
    (
        "seed string",
        lambda d: d.update(randomness={"seed": "abc"}),
        r"randomness.seed.*valid integer",
    ),
    (
        "very long string",
        lambda d: d.update(resume="x" * 10000),
        r"resume.*at most 4096 characters",
    ),
    ("amp not bool", lambda d: d.update(amp="sometimes"), r"amp.*valid boolean"),
    (
        "load_from unknown key",
        lambda d: d.update(load_from={"uri": "x.pth", "strictt": True}),
        r"load_from.strictt.*unknown key",
    ),
    (
        "auto_scale_lr without base",
        lambda d: d.update(auto_scale_lr={"enable": True}),
        r"auto_scale_lr.base_batch_size: required key is missing",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_configs_are_reported_clearly(name, mutate, message, tmp_path):
    data = base()
    mutate(data)
    data["work_dir"] = data.get("work_dir", str(tmp_path / "wd"))
    with pytest.raises(ConfigError, match=message):
        load_config(data)
    assert not (tmp_path / "wd").exists()


def test_battery_is_large_enough():
    assert len(BAD) >= 25


def test_every_problem_at_once_with_lines(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            experiment_name: many
            model:
              type: MLP
              in_features: 8
              num_classes: 3
              widht: 4
            train_data:
              dataset: {type: SyntheticClassification}
              batch_size: -2
            optim_wrapper:
              optimizer: {type: os.system}
            train:
              max_epochs: 0
            unknown_thing: 1
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = {p.path: p for p in info.value.problems}
    assert set(problems) == {
        "model.widht",
        "train_data.batch_size",
        "optim_wrapper.optimizer.type",
        "train.max_epochs",
        "unknown_thing",
    }
    assert problems["model.widht"].line == 6
    assert problems["train_data.batch_size"].line == 9
    assert problems["optim_wrapper.optimizer.type"].line == 11
    assert problems["train.max_epochs"].line == 13
    assert problems["unknown_thing"].line == 14
    assert "5 problems" in str(info.value) and "(line 6, column 3)" in str(info.value)


def test_yaml_syntax_error_shows_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("experiment_name: x\nmodel: {type: MLP\ntrain: [\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error") as info:
        load_config(path)
    assert info.value.problems[0].line is not None


def test_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(BASE + "experiment_name: again\n")
    with pytest.raises(ConfigError, match=r"experiment_name \(line 10, column 1\): duplicate key"):
        load_config(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of keys to values, found a list"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/no_such.yaml")


def test_deep_nesting_is_refused():
    text = "experiment_name: deep\nmodel: " + "[" * 40 + "]" * 40 + "\n"
    with pytest.raises(ConfigError, match="nests deeper than"):
        load_config(text)


def test_allowed_modules_admit_a_users_package(monkeypatch, user_package):
    data = base()
    data["model"] = {"type": "mymodels.Net", "width": 3}
    with pytest.raises(ConfigError, match="outside the allowed modules.*BATON_ALLOWED_MODULES"):
        load_config(data)
    data["allowed_modules"] = ["mymodels"]
    with pytest.raises(ConfigError, match="allowed_modules is not a config key.*tool.baton"):
        load_config(data)
    data.pop("allowed_modules")
    monkeypatch.setenv("BATON_ALLOWED_MODULES", "mymodels")
    assert load_config(data).model["width"] == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("load_from", {"uri": "https://example.invalid/w.pth"}), ("resume", "s3://bucket/ckpt.pth")],
)
def test_uri_schemes_must_be_allowed(field, value, monkeypatch):
    data = base()
    data[field] = value
    scheme = "https" if field == "load_from" else "s3"
    with pytest.raises(
        ConfigError, match=f"scheme '{scheme}' is not allowed.*BATON_ALLOWED_SCHEMES"
    ):
        load_config(data)
    data["allowed_schemes"] = [scheme]
    with pytest.raises(ConfigError, match="allowed_schemes is not a config key"):
        load_config(data)
    data.pop("allowed_schemes")
    monkeypatch.setenv("BATON_ALLOWED_SCHEMES", scheme)
    load_config(data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim_wrapper.optimizer.lr": "fast"}, r"optim_wrapper.optimizer.lr.*valid number"),
        ({"compile": {"mode": "max-autotune", "fast": True}}, r"compile.fast.*unknown key"),
        ({"compile": {"backend": "mypkg.backend"}}, r"compile.backend"),
        ({"optim_wrapper.clip_grad": {"max_norm": 1.0, "nrom_type": 2}}, r"clip_grad.nrom_type"),
        ({"optim_wrapper.clip_grad": {"type": "value"}}, r"value clipping.*clip_value"),
        ({"model.hidden": [16, -4]}, r"model.hidden.*greater than or equal to 1"),
        ({"model": {"type": "Linear", "in_features": 8, "out_features": -3}}, r"model.*negative"),
        ({"optim_wrapper.optimizer.momentum": -1}, r"optim_wrapper.optimizer.*momentum"),
        ({"model.hidden": {"type": "MLP"}}, r"model.hidden.*not a slot"),
        (
            {"train_data.dataset": {"type": "DigitsDataset", "split": "test"}},
            r"train_data.dataset.split.*'train' or 'val'",
        ),
    ],
)
def test_what_would_fail_at_run_time_fails_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base(), overrides)


@pytest.mark.parametrize(
    "name", ["ReduceOnPlateauLR", "baton.optim.schedulers.plateau.ReduceOnPlateauParamScheduler"]
)
def test_a_plateau_scheduler_needs_the_validations_it_follows(name):
    data = base()
    data["param_scheduler"] = [{"type": name, "by_epoch": False, "convert_to_iter_based": True}]
    if "ParamScheduler" in name:
        data["param_scheduler"][0]["param_name"] = "lr"
    with pytest.raises(ConfigError) as err:
        load_config(data)
    problems = {p.path: p.message for p in err.value.problems}
    assert problems["param_scheduler.0.type"] == f"{name} needs val_data"
    assert "remove by_epoch" in problems["param_scheduler.0.by_epoch"]
    assert "remove convert_to_iter_based" in problems["param_scheduler.0.convert_to_iter_based"]


def test_a_constructor_that_changes_its_arguments_never_changes_the_config():
    # one validated config serves every task of a process: each build gets copies
    cfg = load_config({**base(), "model": {"type": "tests.baton.helpers.GreedyMLP", "hidden": [8]}})
    before = cfg.config_hash
    for _ in range(2):
        pl.build_pipeline(cfg)
    assert cfg.model["hidden"] == [8] and cfg.config_hash == before


def test_objects_given_from_python_are_passed_as_they_are():
    from baton.build import registry

    layer = torch.nn.Linear(2, 2)
    copied = registry._plain_copy({"inner": layer, "sizes": [1, [2]]})
    assert copied["inner"] is layer and copied["sizes"] == [1, [2]]
