"""Stage configs: typed loading, overrides, clear errors before any work; schedule and param groups."""

import math

import pytest
import yaml

from mmbridge.train.config import ConfigError, load_stage_config
from mmbridge.train.schedule import lr_at


@pytest.fixture
def stage_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a-0.tar").write_bytes(b"")
    raw = {
        "stage": "s1", "model": "model", "train": ["qformer", "projection"],
        "data": {"batch_size": 2, "datasets": [
            {"name": "caps", "type": "webdataset", "shards": "shards/a-{0..0}.tar", "weight": 115}]},
        "schedule": {"total_steps": 10, "warmup_steps": 2, "init_lr": "1e-4"},
    }

    def write(**changes):
        data = yaml.safe_load(yaml.safe_dump(raw))
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split("__")
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            node[last] = value
        path = tmp_path / "stage.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def test_loads_resolves_paths_and_types(stage_file, tmp_path):
    cfg = load_stage_config(stage_file(), ["schedule.min_lr=1e-5", "data.datasets.0.weight=2", "optim.grad_accum=3"])
    assert cfg.model == str((tmp_path / "model").resolve())
    assert cfg.schedule.init_lr == 1e-4 and cfg.schedule.min_lr == 1e-5  # "1e-4" string -> float
    assert cfg.data.datasets[0].weight == 2.0 and cfg.optim.grad_accum == 3
    assert cfg.data.datasets[0].shards == [str((tmp_path / "shards" / "a-{0..0}.tar").resolve())]


def test_paths_in_the_file_are_relative_to_it_and_paths_in_overrides_to_the_working_directory(
        stage_file, tmp_path, monkeypatch):
    """`mmbridge train recipes/x.yaml model=runs/a/model` from the repository root means ./runs/a/model (it was
    resolved against the YAML's folder, and a missing model then read as "unknown component(s)")."""
    elsewhere = tmp_path / "cwd"
    (elsewhere / "runs" / "m").mkdir(parents=True)
    (elsewhere / "runs" / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(elsewhere)
    cfg = load_stage_config(stage_file(), ["model=runs/m"])
    assert cfg.model == str((elsewhere / "runs" / "m").resolve())
    assert cfg.data.datasets[0].shards == [str((tmp_path / "shards" / "a-{0..0}.tar").resolve())]  # the file's own
    with pytest.raises(ConfigError, match="not an mmbridge model directory"):  # not "unknown component(s)"
        load_stage_config(stage_file(train=["act.decoders"]), ["model=runs/missing"])


def test_an_override_one_past_a_lists_end_appends_to_it(stage_file, tmp_path):
    """How a recipe adds a dataset to a stage's mix (`data.datasets.N={...}`, N = the number it has)."""
    cfg = load_stage_config(stage_file(), ['data.datasets.1={"name": "more", "type": "webdataset", '
                                           f'"shards": "{tmp_path / "shards" / "a-0.tar"}", "weight": 3}}'])
    assert [(d.name, d.weight) for d in cfg.data.datasets] == [("caps", 115), ("more", 3)]
    with pytest.raises(ConfigError, match="not an index of a list of 1"):
        load_stage_config(stage_file(), ['data.datasets.2={"name": "gap", "type": "webdataset"}'])


@pytest.mark.parametrize("changes, overrides, message", [
    ({"train": ["qformer", "vison"]}, [], "unknown component(s) ['vison']"),
    ({"data__datasets__0__shards": "shards/missing-{0..1}.tar"}, [], "missing data path"),
    ({"model": "nowhere"}, [], "not an mmbridge model directory"),
    ({}, ["schedule.init_lrr=1"], "did you mean 'init_lr'"),
    ({}, ["data.batch_size=two"], "data.batch_size: expected an integer"),
    ({}, ["optim.lr_mult={llm: 2}"], "do not train in this stage"),
    ({}, ["losses={fid: 1}"], "unknown loss"),
    ({"data__datasets__0__type": "parquet"}, [], "is not one of"),
    ({}, ["schedule.warmup_steps=11"], "warmup_steps"),
    ({}, ["nokey"], "key=value"),
    ({}, ["token_rows=[]"], "token_rows: name at least one added token"),
])
def test_bad_config_is_a_clear_error(stage_file, changes, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_stage_config(stage_file(**changes), overrides)
    assert message in str(err.value)


def test_cli_bad_config_fails_before_any_work(stage_file, tmp_path, capsys):
    from mmbridge.cli import main

    out = tmp_path / "run"
    code = main(["train", str(stage_file(train=["qformer", "eyes"])), "--out", str(out)])
    assert code == 2
    assert "unknown component(s) ['eyes']" in capsys.readouterr().err
    assert not out.exists()  # nothing was created: the error came before the work


def test_warmup_cosine_schedule_matches_lavis():
    from mmbridge.train.config import ScheduleConfig

    cfg = ScheduleConfig(total_steps=100, warmup_steps=10, warmup_lr=1e-6, init_lr=1e-4, min_lr=8e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(5, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lr_at(10, cfg) == pytest.approx(1e-4)
    assert lr_at(55, cfg) == pytest.approx(8e-5 + 2e-5 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(8e-5)
    # LAVIS mode: warmup inside epoch 0, then one cosine value per epoch.
    lavis = ScheduleConfig(total_steps=400, warmup_steps=50, warmup_lr=1e-6, init_lr=1e-4, min_lr=8e-5,
                           iters_per_epoch=100)
    assert lr_at(60, lavis) == pytest.approx(1e-4)
    assert lr_at(150, lavis) == lr_at(199, lavis) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_param_groups_decay_and_lr_multipliers():
    from mmbridge.testing import build_tiny
    from mmbridge.train.config import stage_config_from_dict
    from mmbridge.train.trainer import param_groups

    model, _ = build_tiny()
    stage = stage_config_from_dict({
        "stage": "x", "model": "m", "train": ["qformer", "projection"],
        "data": {"datasets": [{"name": "d", "type": "llava_json", "path": "x.json"}]},
        "schedule": {"total_steps": 1, "init_lr": 1e-4}, "optim": {"lr_mult": {"projection": 10}}}, check_paths=False)
    groups = {(g["component"], g["weight_decay"] > 0): g for g in param_groups(model, stage)}
    assert groups[("projection", True)]["lr"] == pytest.approx(1e-3)
    assert groups[("qformer", True)]["lr"] == pytest.approx(1e-4)
    no_decay = groups[("qformer", False)]["names"]
    assert all(n.endswith("bias") or "LayerNorm" in n or "layernorm" in n for n in no_decay)
    assert "qformer.query_tokens" in groups[("qformer", True)]["names"]  # LAVIS decays the queries
    trained = {n for g in groups.values() for n in g["names"]}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["tiny_stage1.yaml", "tiny_stage2.yaml"])
def test_shipped_recipes_are_valid(name):
    from importlib import resources

    path = resources.files("mmbridge.recipes").joinpath(name)
    cfg = load_stage_config(path, check_paths=False)
    assert cfg.train and cfg.schedule.total_steps > cfg.schedule.warmup_steps


def test_cli_takes_overrides_before_and_after_options(stage_file, tmp_path, capsys):
    from mmbridge.cli import main

    code = main(["train", str(stage_file()), "schedule.total_steps=5", "--out", str(tmp_path / "r"),
                 "train=[qformer, eyes]", "--max-steps", "2"])
    assert code == 2 and "['eyes']" in capsys.readouterr().err


def test_a_partial_mapping_keeps_the_rest_of_its_fields_default_instance():
    # `act_edit.overrides=[...]` alone failed with "missing required key 'act_edit.config'": the stage's
    # YAML lives in the recipe's default instance, not in the class
    from mmbridge.pretrain.recipe import load_recipe

    cfg = load_recipe("shapes", ["act_edit.overrides=[schedule.total_steps=2000]", "act.edit_pairs=16"])
    assert cfg.act_edit.config == "shapes_act_edit.yaml"
    assert cfg.act_edit.overrides == ["schedule.total_steps=2000"]
    assert cfg.act.edit_pairs == 16 and cfg.act.train_scenes == load_recipe("shapes").act.train_scenes


def test_token_rows_match_exact_names_or_a_prefix():
    from mmbridge.train.trainer import token_row_matches

    patterns = ["[EDIT]", "[EDIT_Q*"]
    assert token_row_matches("[EDIT]", patterns) and token_row_matches("[EDIT_Q12]", patterns)
    assert not token_row_matches("[E]", patterns)  # no glob classes: "[EDIT]" is a name, not a set of letters
    assert not token_row_matches("[DET]", patterns) and not token_row_matches("[EDIT_X]", patterns)
