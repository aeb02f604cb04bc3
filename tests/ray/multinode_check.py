"""Run by test_multinode.py in a fresh process: a 3-node Ray cluster on this machine, each node with its own
custom resource; the attention actor on one node, the two expert actors on the other two. Prints JSON."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from llama4serve.cluster import LLM, SamplingParams


def main(path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"node_a": 10}})
    cluster.add_node(num_cpus=4, resources={"node_b": 10, "expert_node": 10})
    cluster.add_node(num_cpus=4, resources={"node_c": 10, "expert_node": 10})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        prompts = [list(range(3, 3 + n)) for n in (37, 5, 20)]
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=True)
        with LLM(path, attention_actors=1, expert_actors=2, dtype="float32", placement_strategy="STRICT_SPREAD",
                 attention_resources={"node_a": 1}, expert_resources={"expert_node": 1}) as llm:
            spread = llm.generate(prompts, params)
            nodes = {name: info["node_id"] for name, info in llm.engine.data_plane.actor_info.items()}
        with LLM(path, dtype="float32", attention_resources={"node_a": 1}) as llm:
            single = llm.generate(prompts, params)
        node_resources = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes()}
        print(json.dumps({
            "nodes": nodes,
            "node_resources": node_resources,
            "spread": [[o.token_ids, o.prompt_logprobs[1:]] for o in spread],
            "single": [[o.token_ids, o.prompt_logprobs[1:]] for o in single],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
