import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.config import (
    Config,
    ModelConfig,
    Range,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    read_config_values,
)
from xmlsparse.errors import XMLSparseError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The sections every config must give; the tests add the section under test after them.
REQUIRED = "data: {dataset: data/somewhere}\nmodel: {intermediate: {size: 64}, head: {fan_in: 8}}\n"
MISSING = "a config names its data set .* start from configs/recipes/bow.yaml .* or configs/quickstart.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def minimal(**sections: dict) -> dict:
    """A config mapping with the required data set and model, and ``sections`` over them."""
    return {"data": {"dataset": "data/somewhere"}, "model": {"intermediate": {"size": 64}, "head": {"fan_in": 8}},
            **sections}


def test_defaults_match_the_paper():
    assert TrainConfig().optimizer.lr == 1.0e-3
    model = ModelConfig()
    assert model.rewire.interval == 1000 and model.rewire.fraction == 0.1
    assert TrainConfig().loss == "squared-hinge"


def _bases() -> set[Path]:
    """The configs that other configs extend."""
    bases = set()
    for path in CONFIGS.rglob("*.yaml"):
        parent = (yaml.safe_load(path.read_text()) or {}).get("extends")
        if parent:
            bases.add((path.parent / parent).resolve())
    return bases


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    if path.resolve() in _bases() and "dataset" not in read_config_values(path).get("data", {}):
        # A base may leave the data to the configs that extend it (paper.yaml, the large sets' grid):
        # they load it, and alone it fails for that reason only.
        with pytest.raises(XMLSparseError, match=f"missing data.dataset: {MISSING}"):
            load_config(path)
        return
    config = load_config(path)
    assert config.train.batch_size > 0


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  head: {type: fixed-fanin, fanin: 32}\n")
    with pytest.raises(XMLSparseError, match=r"unknown key 'model.head.fanin'; did you mean 'model.head.fan_in'"):
        load_config(path)


def test_unknown_section_suggests_the_closest(tmp_path):
    path = write(tmp_path / "c.yaml", "trian: {epochs: 3}\n")
    with pytest.raises(XMLSparseError, match=r"c.yaml: unknown key 'trian'; did you mean 'train'"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: many}\n")
    with pytest.raises(XMLSparseError, match=r"train.epochs = 'many': expected int"):
        load_config(path)


def test_choice_outside_the_options(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {loss: hinge}\n")
    with pytest.raises(XMLSparseError, match=r"train.loss = 'hinge': expected one of squared-hinge, bce"):
        load_config(path)


def test_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "model: {rewire: 5}\n")
    with pytest.raises(XMLSparseError, match=r"model.rewire = 5: expected a mapping"):
        load_config(path)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: 3\n")
    with pytest.raises(XMLSparseError, match=r"c.yaml: not valid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(XMLSparseError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED + "train: {epochs: 3}\n")
    config = load_config(path, ["train.epochs=7", "model.intermediate=null", "train.optimizer.lr=1e-4"])
    assert config.train.epochs == 7 and config.model.intermediate is None
    assert config.train.optimizer.lr == pytest.approx(1e-4)
    with pytest.raises(XMLSparseError, match=r"unknown key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(path, ["train.epoch=7"])
    with pytest.raises(XMLSparseError, match=r"expected KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])


def test_extends_merges_deeply_and_detects_cycles(tmp_path):
    write(tmp_path / "base.yaml", "data: {dataset: d}\ntrain: {epochs: 3, batch_size: 64}\nmodel: {head: {fan_in: 16}}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 5}\n")
    config = load_config(child)
    assert (config.train.epochs, config.train.batch_size, config.model.head.fan_in) == (5, 64, 16)
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(XMLSparseError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dataset_may_be_a_mapping_of_paths():
    config = config_from_dict(minimal(data={"dataset": {"train": "a.txt", "test": "b.txt"}}))
    assert config.data.dataset == {"train": "a.txt", "test": "b.txt"}


def test_schedule_metric_must_be_reported(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED + "train: {early_stopping: {metric: P@10}}\n")
    with pytest.raises(XMLSparseError, match=r"train.early_stopping.metric = 'P@10' is not a reported metric; did you mean"):
        load_config(path)
    path = write(tmp_path / "c.yaml", REQUIRED + "train: {schedule: {metric: ndcg@5}}\n")
    with pytest.raises(XMLSparseError, match=r"did you mean 'nDCG@5'"):
        load_config(path)
    assert load_config(path, ["train.schedule.metric=PSP@5"]).train.schedule.metric == "PSP@5"


def test_checkpoint_intervals_must_be_positive(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED + "train: {checkpoint: {every_epochs: 3, every_minutes: 30}}\n")
    checkpoint = load_config(path).train.checkpoint
    assert (checkpoint.every_epochs, checkpoint.every_minutes, checkpoint.background) == (3, 30.0, True)
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.every_epochs = 0: out of range, expected a value >= 1"):
        load_config(path, ["train.checkpoint.every_epochs=0"])
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.every_minutes = -1: out of range, expected a value > 0"):
        load_config(path, ["train.checkpoint.every_minutes=-1"])
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.background = 'sometimes': expected bool"):
        load_config(path, ["train.checkpoint.background=sometimes"])
    assert load_config(path, ["train.checkpoint.every_minutes=null"]).train.checkpoint.every_minutes is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", "train.batch_size = 0: out of range, expected a value >= 1"),
        ("train.batch_size=-5", "train.batch_size = -5: out of range, expected a value >= 1"),
        ("train.eval_batch_size=0", "train.eval_batch_size = 0: out of range, expected a value >= 1"),
        ("train.epochs=0", "train.epochs = 0: out of range, expected a value >= 1"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch = 0: out of range, expected a value >= 1"),
        ("train.seed=-1", "train.seed = -1: out of range, expected a value in [0, 4294967295]"),
        ("train.optimizer.lr=-1", "train.optimizer.lr = -1: out of range, expected a value > 0"),
        ("train.optimizer.lr=0", "train.optimizer.lr = 0: out of range, expected a value > 0"),
        ("train.optimizer.lr=.nan", "train.optimizer.lr = nan: out of range, expected a value > 0"),
        ("train.optimizer.lr=.inf", "train.optimizer.lr = inf: out of range, expected a value > 0"),
        ("train.optimizer.lr_head=-1e-3", "train.optimizer.lr_head = '-1e-3': out of range, expected a value >= 0"),
        ("train.optimizer.weight_decay=-0.01", "train.optimizer.weight_decay = -0.01: out of range, expected a value >= 0"),
        ("train.schedule.factor=1", "train.schedule.factor = 1: out of range, expected a value in (0, 1)"),
        ("train.schedule.factor=0", "train.schedule.factor = 0: out of range, expected a value in (0, 1)"),
        ("train.schedule.patience=-1", "train.schedule.patience = -1: out of range, expected a value >= 0"),
        ("train.schedule.warmup_steps=-1", "train.schedule.warmup_steps = -1: out of range, expected a value >= 0"),
        ("train.schedule.min_lr=-1.0e-5", "train.schedule.min_lr = -1e-05: out of range, expected a value >= 0"),
        ("train.early_stopping.patience=-1", "train.early_stopping.patience = -1: out of range, expected a value >= 0"),
        ("data.validation=0", "data.validation = 0: out of range, expected a value in (0, 1)"),
        ("data.validation=1", "data.validation = 1: out of range, expected a value in (0, 1)"),
        ("data.validation_max_points=0", "data.validation_max_points = 0: out of range, expected a value >= 1"),
        ("model.encoder.dim=0", "model.encoder.dim = 0: out of range, expected a value >= 1"),
        ("model.encoder.dropout=1", "model.encoder.dropout = 1: out of range, expected a value in [0, 1)"),
        ("model.encoder.input_dropout=-0.1", "model.encoder.input_dropout = -0.1: out of range, expected a value in [0, 1)"),
        ("model.encoder.hidden=[64, 0]", "model.encoder.hidden = [64, 0]: 0 is out of range, every entry must be >= 1"),
        ("model.encoder.hidden=[64, x]", "model.encoder.hidden[1] = 'x': expected int, got str"),
        ("model.intermediate.size=0", "model.intermediate.size = 0: out of range, expected a value >= 1"),
        ("model.head.fan_in=0", "model.head.fan_in = 0: out of range, expected a value >= 1"),
        ("model.head.rank=-3", "model.head.rank = -3: out of range, expected a value >= 1"),
        ("model.rewire.interval=0", "model.rewire.interval = 0: out of range, expected a value >= 1"),
        ("model.rewire.fraction=0", "model.rewire.fraction = 0: out of range, expected a value in (0, 1]"),
        ("model.rewire.fraction=1.5", "model.rewire.fraction = 1.5: out of range, expected a value in (0, 1]"),
        ("model.rewire.threshold=-1", "model.rewire.threshold = -1: out of range, expected a value >= 0"),
        ("model.rewire.threshold_decay=0", "model.rewire.threshold_decay = 0: out of range, expected a value in (0, 1]"),
        ("model.rewire.stop=1.5", "model.rewire.stop = 1.5: out of range, expected a value in [0, 1]"),
        ("train.checkpoint.every_minutes=0", "train.checkpoint.every_minutes = 0: out of range, expected a value > 0"),
        ("eval.k=[0, 1]", "eval.k = [0, 1]: 0 is out of range, every entry must be >= 1"),
        ("eval.k=[]", "eval.k = []: expected at least one k"),
    ],
)
def test_values_outside_their_range_name_the_key_and_the_range(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", REQUIRED)
    with pytest.raises(XMLSparseError) as error:
        load_config(path, [override])
    assert str(error.value) == f"{path}: {message}"


def test_the_ends_of_the_ranges_that_belong_to_them_load(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED)
    config = load_config(path, [
        "data.validation=0.5", "model.encoder.dropout=0", "model.rewire.fraction=1", "model.rewire.stop=0",
        "model.rewire.threshold=0", "model.rewire.threshold_decay=1", "train.schedule.patience=0",
        "train.early_stopping.patience=0", "train.optimizer.lr_encoder=0", "train.seed=0", "train.epochs=1",
        "model.head.fan_in=64",
    ])
    assert (config.model.rewire.stop, config.train.optimizer.lr_encoder, config.model.head.fan_in) == (0.0, 0.0, 64)


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every int, float or list-of-int field of the schema below ``cls``, with its dotted key."""
    found = []
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        options = [o for o in typing.get_args(hints[spec.name]) or [hints[spec.name]] if o is not type(None)]
        for option in options:
            if dataclasses.is_dataclass(option):
                found += _numeric_fields(option, key + ".")
            elif option in (int, float, list[int]):
                found.append((key, spec))
    return found


def test_every_number_of_the_schema_declares_its_range():
    numeric = _numeric_fields(Config)
    assert "train.batch_size" in dict(numeric) and "model.encoder.hidden" in dict(numeric)
    assert [key for key, spec in numeric if not isinstance(spec.metadata.get("range"), Range)] == []


def test_the_model_must_fit_its_inputs(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED)
    with pytest.raises(XMLSparseError, match=r"model.head.fan_in = 65 exceeds the 64 inputs the head reads \(model.intermediate"):
        load_config(path, ["model.head.fan_in=65"])
    with pytest.raises(XMLSparseError, match=r"fan_in = 33 exceeds the 32 inputs the head reads \(model.encoder.hidden\)"):
        load_config(path, ["model.intermediate=null", "model.encoder.hidden=[32]", "model.head.fan_in=33"])
    with pytest.raises(XMLSparseError, match=r"fan_in = 33 exceeds the 16 inputs the head reads \(model.encoder.dim\)"):
        load_config(path, ["model.intermediate=null", "model.encoder.dim=16", "model.head.fan_in=33"])
    # Without hidden layers a dense encoder passes on the data's columns, unknown until they load.
    assert load_config(path, ["model.intermediate=null", "data.features=dense"]).model.intermediate is None
    with pytest.raises(XMLSparseError, match=r"model.encoder.type = 'dense' but data.features = 'bow': they must agree"):
        load_config(path, ["model.encoder.type=dense"])


def test_a_default_metric_that_eval_k_leaves_out_is_named_as_the_default(tmp_path):
    path = write(tmp_path / "c.yaml", REQUIRED + "eval: {k: [1, 10]}\n")
    with pytest.raises(XMLSparseError) as error:
        load_config(path)
    assert str(error.value) == (
        f"{path}: the default metric P@3 of train.schedule.metric and train.early_stopping.metric is not reported "
        "with eval.k = [1, 10]; set train.schedule.metric and train.early_stopping.metric to a reported metric "
        "(such as P@1) or add 3 to eval.k"
    )
    # Only the plateau schedule reads a metric; a metric the config sets is blamed as written.
    with pytest.raises(XMLSparseError, match=r"the default metric P@3 of train.early_stopping.metric is not reported"):
        load_config(path, ["train.schedule.type=cosine"])
    with pytest.raises(XMLSparseError, match=r"train.early_stopping.metric = 'P@3' is not a reported metric"):
        load_config(path, ["train.schedule.metric=P@10", "train.early_stopping.metric=P@3"])
    config = load_config(path, ["train.schedule.metric=P@10", "train.early_stopping.metric=nDCG@10"])
    assert config.eval.k == [1, 10]
    assert load_config(path, ["eval.k=[1, 3, 10]"]).train.schedule.metric == "P@3"


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("", "data.dataset and model"),
        ("train: {epochs: 3}\n", "data.dataset and model"),
        ("data: {features: dense}\nmodel: {head: {type: dense}}\n", "data.dataset"),
        ("data: {}\nmodel: {head: {type: dense}}\n", "data.dataset"),
        ("data: {dataset: d}\n", "model"),
        ("data: {dataset: d}\nmodel: {}\n", "model"),
    ],
)
def test_the_data_set_and_the_model_must_be_given(tmp_path, text, missing):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(XMLSparseError, match=f"c.yaml: missing {missing}: {MISSING}"):
        load_config(path)


def test_config_from_dict_requires_the_data_set_and_the_model():
    with pytest.raises(XMLSparseError, match=f"config: missing data.dataset and model: {MISSING}"):
        config_from_dict({})
    assert config_from_dict(minimal()).data.dataset == "data/somewhere"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.batch_size=0"], "train.batch_size = 0: out of range, expected a value >= 1"),
        (["--set", "train.epochs=0"], "train.epochs = 0: out of range, expected a value >= 1"),
        (["--set", "train.optimizer.lr=-1"], "train.optimizer.lr = -1: out of range, expected a value > 0"),
        (["--set", "data.validation=0"], "data.validation = 0: out of range, expected a value in (0, 1)"),
        (["--set", "eval.k=[1,10]"], "the default metric P@3 of train.schedule.metric and train.early_stopping.metric"),
        (["--set", "model.head.fan_in=100"], "model.head.fan_in = 100 exceeds the 64 inputs the head reads"),
        (["--set", "model={}"], "missing model: a config names its data set"),
        # Valid as a config: the data set is looked for when the trainer is built, still before the run directory.
        (["--set", "data.dataset=nowhere"], "nowhere"),
    ],
)
def test_train_rejects_a_bad_config_in_one_line_before_making_the_run_directory(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path / "c.yaml", REQUIRED + "train: {device: cpu}\n")
    out = tmp_path / "runs" / "bad"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
