"""Starting a distributed run: `spo train` re-executes itself under `accelerate launch` or the `deepspeed` launcher.

The recipe's `hardware` section says how many processes and machines take part and whether DeepSpeed runs; the
command built here passes exactly that to the launcher, which starts `python -m spo_cli <the same arguments>` once
per process. Those processes find the launcher's variables (RANK, WORLD_SIZE, ...) and `SPO_LAUNCHED` in their
environment and run the loop instead of launching again.

Imports neither torch nor the launchers: the parent process only validates, builds a command and execs it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

from spo_cli.errors import SpoUserError
from spo_cli.recipe import Hardware

LAUNCHED_ENV = "SPO_LAUNCHED"


def already_launched(env: Mapping[str, str]) -> bool:
    """Whether a launcher (ours, or torchrun/srun/accelerate run by hand) started this process."""
    return env.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in env or ("RANK" in env and "WORLD_SIZE" in env)


def needs_launch(hardware: Hardware, env: Mapping[str, str]) -> bool:
    return hardware.distributed and hardware.launcher != "none" and not already_launched(env)


def launch_command(hardware: Hardware, spo_args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The launcher command line that runs `python -m spo_cli *spo_args` in every process of this machine."""
    machines = hardware.num_machines
    if hardware.launcher == "accelerate":
        cmd = [python, "-m", "accelerate.commands.launch"]
        if hardware.accelerate_config:
            cmd += ["--config_file", hardware.accelerate_config]
        if hardware.num_processes is not None:
            cmd += ["--num_processes", str(hardware.num_processes)]
        if not hardware.accelerate_config:
            # DeepSpeed is configured in the processes themselves (from the recipe), so the launch is the same
            # for DDP and DeepSpeed: one process per device, or the simple launcher for one process.
            if (hardware.num_processes or 1) > 1 or machines > 1:
                cmd += ["--multi_gpu"]
            cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--num_machines", str(machines), "--machine_rank", str(hardware.machine_rank)]
        if hardware.main_process_ip:
            cmd += ["--main_process_ip", hardware.main_process_ip]
        cmd += ["--main_process_port", str(hardware.main_process_port)]
        return [*cmd, "-m", "spo_cli", *spo_args]
    if hardware.launcher == "deepspeed":
        per_machine = (hardware.num_processes or 1) // machines
        cmd = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(per_machine)]
        cmd += ["--master_port", str(hardware.main_process_port)]
        if hardware.main_process_ip:
            cmd += ["--master_addr", hardware.main_process_ip]
        if machines > 1:
            # Started once per machine by the user (like accelerate), not over ssh from machine 0.
            cmd += ["--num_nodes", str(machines), "--node_rank", str(hardware.machine_rank), "--no_ssh"]
        return [*cmd, "--module", "--no_local_rank", "spo_cli", *spo_args]
    raise AssertionError(f"launcher {hardware.launcher!r} launches nothing")


def check_launcher_installed(hardware: Hardware) -> None:
    """Fail before launching when the launcher or DeepSpeed is missing (the processes would all die alike)."""
    wants_deepspeed = hardware.launcher == "deepspeed" or hardware.deepspeed is not None
    if wants_deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise SpoUserError(
            "`hardware.deepspeed` / `hardware.launcher: deepspeed` need DeepSpeed, which is not installed: "
            "pip install deepspeed (or the spo[deepspeed] extra)"
        )


def relaunch(hardware: Hardware, spo_args: Sequence[str], extra_env: Mapping[str, str] | None = None) -> None:
    """Replace this process by the launcher (signals and the exit status are then the launcher's own); `extra_env`
    reaches the launched processes."""
    check_launcher_installed(hardware)
    cmd = launch_command(hardware, spo_args)
    env = {**os.environ, **(extra_env or {}), LAUNCHED_ENV: "1"}
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
