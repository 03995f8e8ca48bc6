import dataclasses
import json

import pytest

from utils.config import load_config, parse_config, save_config


@dataclasses.dataclass
class _Config:
    exp_name: str = dataclasses.field(default="debug", metadata={"help": "run name"})
    lr: float = 3e-4
    epochs: int = 10
    eval_only: bool = False
    gradient_checkpointing: bool = True
    vision_tower: str | None = None
    precision: str = dataclasses.field(
        default="bf16", metadata={"choices": ["fp32", "bf16", "fp16"]}
    )


def test_defaults_and_types():
    config = parse_config(_Config, [])
    assert config == _Config()
    config = parse_config(_Config, ["--lr", "1e-4", "--epochs", "3", "--exp_name", "x"])
    assert (config.lr, config.epochs, config.exp_name) == (1e-4, 3, "x")


def test_booleans_switch_both_ways():
    assert parse_config(_Config, ["--eval_only"]).eval_only is True
    assert parse_config(_Config, ["--no-gradient_checkpointing"]).gradient_checkpointing is False
    assert parse_config(_Config, ["--no-gradient-checkpointing"]).gradient_checkpointing is False


def test_dash_spelling_and_aliases():
    config = parse_config(_Config, ["--vision-tower", "/clip"])
    assert config.vision_tower == "/clip"


def test_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--precision", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_save_and_load_round_trip(tmp_path):
    config = _Config(lr=0.5, eval_only=True)
    path = save_config(config, tmp_path / "run" / "config.json")
    assert json.loads(path.read_text())["lr"] == 0.5
    assert load_config(_Config, path) == config


def test_load_rejects_unknown_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lr": 1.0, "typo_field": 2}))
    with pytest.raises(ValueError, match="typo_field"):
        load_config(_Config, path)


def test_every_boolean_spelling_means_what_it_says():
    @dataclasses.dataclass
    class Flags:
        no_eval: bool = False
        auto_resume: bool = True

    cases = {
        ("--no-eval",): (True, True),  # the field's own spelling sets it (argparse: "evaluate")
        ("--no_eval",): (True, True),
        ("--no_eval=false",): (False, True),
        ("--no-auto-resume",): (False, False),
        ("--no_auto_resume",): (False, False),
        ("--auto_resume=false",): (False, False),
        ("--auto-resume", "no"): (False, False),
        ("--auto_resume=yes",): (False, True),
    }
    for argv, (no_eval, auto_resume) in cases.items():
        parsed = parse_config(Flags, list(argv))
        assert (parsed.no_eval, parsed.auto_resume) == (no_eval, auto_resume), argv
    for argv in (["--auto_resume=maybe"], ["--no-auto-resume=true"]):
        with pytest.raises(SystemExit) as error:
            parse_config(Flags, argv)
        assert error.value.code == 2
