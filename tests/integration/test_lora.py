"""LoRA adapters (the recipe's `lora` section) on the tiny model: what the adapters compute, the KL reference that
shares the base weights, checkpoints that hold the adapter and the merged weights, an exact resume after a kill,
and two processes under DDP and DeepSpeed ZeRO-2 training like one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spo_cli.errors import SpoUserError
from spo_cli.faults import CRASH_ENV
from spo_cli.lora import AdapterDisabledReference, apply_lora, merged_state_dict
from spo_cli.recipe import Lora

from ..conftest import REPO, free_port, tiny_recipe_dict, write_recipe
from .test_distributed import SECTIONS as DISTRIBUTED_SECTIONS
from .test_distributed import assert_same_training, metrics

LORA = {"r": 4, "lora_alpha": 8.0}
# test_distributed's settings (every iteration trains, a KL term), with a checkpoint every iteration, adapters and
# a learning rate for them.
SECTIONS = {
    **DISTRIBUTED_SECTIONS,
    "train": {**DISTRIBUTED_SECTIONS["train"], "save_steps": 1, "save_total_limit": 2},
    "optim": {"learning_rate": 1e-3},
    "lora": LORA,
}

def ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


def with_moved_adapters(model, seed: int = 0):
    """A LoRA model whose B matrices are not zero (fresh adapters compute exactly the base model)."""
    policy = apply_lora(copy.deepcopy(model), Lora(**LORA), seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy


def test_merged_weights_compute_what_the_adapters_compute(tiny_policy, tmp_path):
    from spo_cli.models import load_checkpoint, save_model

    model, tokenizer = tiny_policy
    policy = with_moved_adapters(model).eval()
    x = ids(tokenizer, "Start at 6. Times 6. Result?")
    with torch.no_grad():
        adapted = policy(x).logits
        assert not torch.allclose(adapted, model(x).logits, atol=1e-4), "the adapters must change the policy"
        plain = copy.deepcopy(model)
        plain.load_state_dict(merged_state_dict(policy))
        assert torch.allclose(plain(x).logits, adapted, atol=1e-5)
    # The checkpoint's model/ is an ordinary Hugging Face directory of the merged weights.
    save_model(policy, tokenizer, tmp_path / "model")
    loaded, _ = load_checkpoint(tmp_path / "model")
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, adapted, atol=1e-5)
    # Merging computed new tensors: the live base weights were not touched (an exact resume depends on it).
    base = dict(policy.get_base_model().named_parameters())
    for name, param in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        key = name if name in base else f"{module}.base_layer.{leaf}"  # an adapted layer keeps its weight there
        assert torch.equal(base[key], param), name


def test_the_kl_reference_is_the_base_model_sharing_its_weights(tiny_policy):
    model, tokenizer = tiny_policy
    policy = with_moved_adapters(model).eval()
    reference = AdapterDisabledReference(policy)
    x = ids(tokenizer, "Start at 3. Add 2. Result?")
    with torch.no_grad():
        assert torch.equal(reference(input_ids=x).logits, model(input_ids=x).logits)
        assert not torch.equal(policy(input_ids=x).logits, model(input_ids=x).logits)  # adapters are back on after
    # No second copy of the weights: the reference's tensors are the policy's own.
    assert {p.data_ptr() for p in reference.parameters()} == {p.data_ptr() for p in policy.parameters()}


def test_target_modules_that_match_nothing_name_the_field(tiny_policy):
    model, _ = tiny_policy
    with pytest.raises(SpoUserError, match=r"`lora.target_modules`.*q_proj"):
        apply_lora(copy.deepcopy(model), Lora(target_modules=["attention.query"]), seed=0)


def test_target_modules_that_match_nothing_exit_2_from_spo_train(tmp_path):
    data = tiny_recipe_dict(tmp_path, lora={"target_modules": ["attention.query"]})
    data["warm_start"] = {"kind": "none"}
    out = spo_train(write_recipe(tmp_path / "r.yaml", data))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "`lora.target_modules`" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists(), "a start that fails early leaves nothing"


def spo_train(path: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "spo_cli", "train", str(path), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def lora_recipe(tmp: Path, name: str, hardware: dict | None = None, **overrides) -> Path:
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    for key, value in overrides.items():
        sections[key] = {**sections.get(key, {}), **value}
    if hardware:
        sections["train"]["per_device_train_batch_size"] = 2
        sections["hardware"] = {"main_process_port": free_port(), **hardware}
    return write_recipe(tmp / f"{name}.yaml", tiny_recipe_dict(tmp / name, **sections))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The one-process LoRA run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("lora")
    done = spo_train(lora_recipe(tmp, "one"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "LoRA: training" in done.stdout
    return tmp / "one" / "run"


def test_lora_trains_only_the_adapters_and_checkpoints_both_forms(one):
    from spo_cli.models import load_checkpoint

    records = metrics(one)
    assert all(r["optimizer_steps"] > 0 for r in records)
    assert records[-1]["kl"] > 0, "the adapters moved the policy away from its base (the reference)"
    ckpt = one / "checkpoints" / "iter_000004"
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    # It was trained on the warm start, not on the recipe's model: that is what users must load it onto.
    assert config["base_model_name_or_path"] == str((one / "warm_start").resolve())
    trained, _ = load_checkpoint(ckpt / "model")
    warm, _ = load_checkpoint(one / "warm_start")
    changed = {n for (n, a), b in zip(trained.named_parameters(), warm.parameters()) if not torch.equal(a, b)}
    # all-linear: every projection of every block moved; embeddings and norms are frozen and stay exactly as they were.
    assert changed and all(n.endswith("proj.weight") for n in changed), sorted(changed)
    # The optimizer holds the adapters' state only.
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    adapter_numel = sum(p.numel() for n, p in _adapter_shapes(ckpt))
    assert sum(s["exp_avg"].numel() for s in state.values()) == adapter_numel


def _adapter_shapes(ckpt: Path):
    from safetensors.torch import load_file

    return load_file(ckpt / "adapter" / "adapter_model.safetensors").items()


def test_a_killed_lora_run_resumes_to_the_uninterrupted_result(one, tmp_path):
    path = lora_recipe(tmp_path, "killed")
    warm = f"warm_start.load_from={one / 'warm_start'}"
    killed = spo_train(path, warm, crash_at="optimize:3")
    assert killed.returncode != 0
    resumed = spo_train(path, warm, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout and "iteration 2" in resumed.stdout
    assert_same_training(metrics(one), metrics(tmp_path / "killed" / "run"), rel=1e-6)


@pytest.mark.parametrize(
    "name,hardware",
    [
        ("ddp", {"num_processes": 2}),
        # ~2 minutes (DeepSpeed's start in two processes): CI's end-to-end phase, to keep the default suite short
        pytest.param("zero2", {"num_processes": 2, "deepspeed": {"zero_stage": 2}}, marks=pytest.mark.slow),
    ],
)
def test_two_processes_train_lora_like_one(one, tmp_path, name, hardware):
    path = lora_recipe(tmp_path, name, hardware)
    done = spo_train(path, f"warm_start.load_from={one / 'warm_start'}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_training(metrics(one), metrics(tmp_path / name / "run"), rel=1e-4)


def test_lora_with_zero3_is_refused_at_recipe_check(tmp_path):
    path = lora_recipe(tmp_path, "zero3", {"num_processes": 2, "deepspeed": {"zero_stage": 3}})
    out = subprocess.run([sys.executable, "-m", "spo_cli", "recipe", "check", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "hardware.deepspeed.zero_stage 3" in out.stderr
