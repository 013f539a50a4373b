"""The shipped Accelerate configs parse and name only real Accelerate options."""

import pytest
import yaml
from conftest import RECIPES

CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_every_setup_is_shipped():
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in CONFIGS}
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED", "XLA"} <= kinds  # the CPU one is launched in tests/distributed
    stages = {yaml.safe_load(p.read_text()).get("deepspeed_config", {}).get("zero_stage") for p in CONFIGS}
    assert {2, 3} <= stages
    assert any(yaml.safe_load(p.read_text())["num_machines"] == 2 for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    assert config.num_processes >= 2
    options = {o.lstrip("-") for action in launch_command_parser()._actions for o in action.option_strings}
    data = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in data.get(section, {}):
            assert key in options, f"{path.name}: {section}.{key} is not an accelerate option"
    text = path.read_text()
    assert text.startswith(f"# recipes/accelerate/{path.name}") and "-m llmkit" in text
