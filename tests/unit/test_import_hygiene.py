"""`spo --help` and `spo recipe check` must not import torch (they stay fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from spo_cli.cli import app
for args in ({args}):
    try:
        app(list(args), standalone_mode=False)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "transformers", "vllm", "datasets", "math_verify") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def run_probe(*arg_lists: list[str]) -> str:
    code = PROBE.format(args=", ".join(repr(tuple(a)) for a in arg_lists) + ",")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_help_and_recipe_check_do_not_import_torch():
    recipes = [str(p) for p in sorted((REPO / "recipes").glob("*.yaml"))]
    assert run_probe(["--help"], ["recipe", "check", *recipes], ["recipe", "show", recipes[0]]) == "HEAVY:"


def test_importing_the_recipe_and_episode_modules_is_light():
    code = "import sys, spo_cli.recipe, spo_cli.episode, spo_cli.estimate, spo_cli.partition; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
