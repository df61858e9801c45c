"""DeepSpeed configs as a run builds them: from the recipe, a JSON file or accelerate's environment."""

from __future__ import annotations

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.optimize.learner import deepspeed_base_config, fill_deepspeed_config
from spo_cli.recipe import DeepSpeed


def test_recipe_settings_become_a_zero_section():
    assert deepspeed_base_config(DeepSpeed(zero_stage=2), {}) == {"zero_optimization": {"stage": 2}}
    assert deepspeed_base_config(DeepSpeed(zero_stage=3, offload_optimizer=True, offload_param=True), {}) == {
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    }
    assert deepspeed_base_config(None, {}) is None


def test_accelerate_launch_environment_is_read_when_the_recipe_says_nothing(tmp_path):
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    }
    assert deepspeed_base_config(None, env) == {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert deepspeed_base_config(None, {"ACCELERATE_USE_DEEPSPEED": "false"}) is None
    file = tmp_path / "ds.json"
    file.write_text('{"zero_optimization": {"stage": 1}}')
    assert deepspeed_base_config(None, {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(file)}) == {
        "zero_optimization": {"stage": 1}
    }
    # The recipe wins over the environment.
    assert deepspeed_base_config(DeepSpeed(zero_stage=0), env) == {"zero_optimization": {"stage": 0}}


def test_a_broken_config_file_names_file_and_line(tmp_path):
    file = tmp_path / "ds.json"
    file.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(SpoUserError, match=rf"hardware.deepspeed`: {file}:3: not valid JSON"):
        deepspeed_base_config(str(file), {})
    file.write_text("[1, 2]")
    with pytest.raises(SpoUserError, match="must be a JSON object"):
        deepspeed_base_config(str(file), {})


def test_batch_clipping_and_precision_come_from_the_recipe():
    filled = fill_deepspeed_config(
        {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}},
        micro_batch=4, accumulation=2, world_size=2, max_grad_norm=1.0, bf16=True,
    )  # fmt: skip
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 16  # 4 x 2 x 2
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    # An explicit value that matches is kept; one that disagrees with the recipe is an error.
    same = fill_deepspeed_config({"gradient_clipping": 1.0}, micro_batch=1, accumulation=1, world_size=1,
                                 max_grad_norm=1.0, bf16=False)  # fmt: skip
    assert same["gradient_clipping"] == 1.0 and same["zero_optimization"] == {"stage": 0}
    with pytest.raises(SpoUserError, match='train_micro_batch_size_per_gpu=8 but the recipe implies 4.*"auto"'):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, micro_batch=4, accumulation=1, world_size=1,
                              max_grad_norm=1.0, bf16=False)  # fmt: skip
