from pathlib import Path

import pytest

from xmlsparse.config import Config, apply_overrides, config_from_dict, load_config
from xmlsparse.errors import XMLSparseError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_match_the_paper():
    config = Config()
    assert config.train.optimizer.lr == 1.0e-3
    assert config.model.rewire.interval == 1000 and config.model.rewire.fraction == 0.1
    assert config.train.loss == "squared-hinge"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
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
    path = write(tmp_path / "c.yaml", "train: {epochs: 3}\n")
    config = load_config(path, ["train.epochs=7", "model.intermediate=null", "train.optimizer.lr=1e-4"])
    assert config.train.epochs == 7 and config.model.intermediate is None
    assert config.train.optimizer.lr == pytest.approx(1e-4)
    with pytest.raises(XMLSparseError, match=r"unknown key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(path, ["train.epoch=7"])
    with pytest.raises(XMLSparseError, match=r"expected KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])


def test_extends_merges_deeply_and_detects_cycles(tmp_path):
    write(tmp_path / "base.yaml", "train: {epochs: 3, batch_size: 64}\nmodel: {head: {fan_in: 16}}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 5}\n")
    config = load_config(child)
    assert (config.train.epochs, config.train.batch_size, config.model.head.fan_in) == (5, 64, 16)
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(XMLSparseError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dataset_may_be_a_mapping_of_paths():
    config = config_from_dict({"data": {"dataset": {"train": "a.txt", "test": "b.txt"}}})
    assert config.data.dataset == {"train": "a.txt", "test": "b.txt"}


def test_schedule_metric_must_be_reported(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {early_stopping: {metric: P@10}}\n")
    with pytest.raises(XMLSparseError, match=r"train.early_stopping.metric = 'P@10' is not a reported metric; did you mean"):
        load_config(path)
    path = write(tmp_path / "c.yaml", "train: {schedule: {metric: ndcg@5}}\n")
    with pytest.raises(XMLSparseError, match=r"did you mean 'nDCG@5'"):
        load_config(path)
    assert load_config(path, ["train.schedule.metric=PSP@5"]).train.schedule.metric == "PSP@5"


def test_checkpoint_intervals_must_be_positive(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {checkpoint: {every_epochs: 3, every_minutes: 30}}\n")
    checkpoint = load_config(path).train.checkpoint
    assert (checkpoint.every_epochs, checkpoint.every_minutes, checkpoint.background) == (3, 30.0, True)
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.every_epochs = 0: expected a positive number"):
        load_config(path, ["train.checkpoint.every_epochs=0"])
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.every_minutes = -1.0: expected a positive number"):
        load_config(path, ["train.checkpoint.every_minutes=-1"])
    with pytest.raises(XMLSparseError, match=r"train.checkpoint.background = 'sometimes': expected bool"):
        load_config(path, ["train.checkpoint.background=sometimes"])
    assert load_config(path, ["train.checkpoint.every_minutes=null"]).train.checkpoint.every_minutes is None
