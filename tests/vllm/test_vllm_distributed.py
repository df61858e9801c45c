"""Two training processes, one colocated vLLM engine each (vLLM's external launcher inside a gloo process group)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO
from ._common import needs_vllm


@needs_vllm
def test_two_processes_each_drive_an_engine_and_sample_what_one_does(tmp_path):
    script = Path(__file__).with_name("_two_processes.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["sharded"] == rank1["sharded"], "every process returns all completions"
    for rank in (rank0, rank1):
        # Split between the processes, the call samples what one engine samples for the whole call.
        for got, want in zip(rank["sharded"], rank["whole"]):
            assert [c[0] for c in got] == [c[0] for c in want]
            for (_, a), (_, b) in zip(got, want):
                assert a == pytest.approx(b, abs=1e-5)
        assert rank["synced"] == rank["reference"], "after sync_weights each engine samples the updated policy"
        assert rank["all_reduce"] == 3.0
