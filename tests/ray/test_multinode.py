"""Multi-node: attention and expert actors on different Ray nodes give the same outputs as one node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reference import MAVERICK_LIKE, write_hf_checkpoint


def test_three_nodes_same_outputs(tmp_path):
    path = write_hf_checkpoint(tmp_path / "ckpt", MAVERICK_LIKE)
    script = Path(__file__).with_name("multinode_check.py")
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    nodes, resources = result["nodes"], result["node_resources"]
    assert set(nodes) == {"attention-0", "expert-0", "expert-1"}
    assert len(set(nodes.values())) == 3, nodes  # three different nodes
    assert resources[nodes["attention-0"]] == ["node_a"]
    assert {resources[nodes["expert-0"]][0], resources[nodes["expert-1"]][0]} == {"node_b", "node_c"}
    for (tokens, lp), (ref_tokens, ref_lp) in zip(result["spread"], result["single"]):
        assert tokens == ref_tokens
        assert lp == pytest.approx(ref_lp, abs=1e-4)
