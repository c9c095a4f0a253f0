"""bench/bench_peers.py's arithmetic (the peers' sizes) and bench/peer_venv.py's worker protocol.

The peers themselves run only in the benchmark (their own venvs); its ``--quick`` mode is in
tests/test_bench_smoke.py's slow set.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_peers  # noqa: E402
from peer_venv import JsonWorker  # noqa: E402

from optipfair_train import count_parameters, prune_model  # noqa: E402


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37])
def test_torch_pruning_parameters_equal_a_model_of_its_widths(tied, ratio):
    config = LlamaConfig(
        hidden_size=72, intermediate_size=200, num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
        head_dim=8, vocab_size=50, tie_word_embeddings=tied,
    )  # fmt: skip
    # Torch-Pruning keeps int(C * (1 - ratio)) channels, rounded down to a multiple of round_to (9 here)
    hidden = int(72 * (1 - ratio)) // 9 * 9
    mlp = int(200 * (1 - ratio)) // 9 * 9
    pruned = config.to_dict() | dict(hidden_size=hidden, intermediate_size=mlp)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**pruned))
    assert bench_peers.torch_pruning_parameters(config, ratio, 9) == model.num_parameters()


def test_torch_pruning_ratio_is_the_nearest_size():
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    total = bench_peers.torch_pruning_parameters(config, 0.0, 1)
    ratio = bench_peers.torch_pruning_ratio(config, 0.25, 9)
    fewer = 1 - bench_peers.torch_pruning_parameters(config, ratio, 9) / total
    others = [
        1 - bench_peers.torch_pruning_parameters(config, r, 9) / total for r in (ratio - 0.01, ratio + 0.01)
    ]
    assert abs(fewer - 0.25) < 0.01
    assert all(abs(fewer - 0.25) <= abs(o - 0.25) for o in others)


def test_optipfair_percentage_removes_the_fewest_neurons_reaching_the_target():
    model = make_tiny_model("llama")
    total = count_parameters(model)
    target = total - 1000  # one neuron of every layer costs 3 x 64 x 4 = 768: two per layer are needed
    percentage, remove = bench_peers.optipfair_percentage(model, target)
    assert remove == 2
    pruned = prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="L2",
                         pruning_percentage=percentage, show_progress=False)  # fmt: skip
    # OptiPFair's rounding (kept = I - int(p / 100 * I)), which our pruning_percentage shares
    assert pruned.config.intermediate_size == 128 - 2
    assert count_parameters(pruned) == total - 2 * 768 <= target < total - 768


def test_json_worker_answers_and_reports_the_peer_side_error(tmp_path):
    source = textwrap.dedent(
        """
        def double(value):
            print("said by the peer library")  # goes to the log, not the protocol
            return {"value": 2 * value}


        def triple(value):
            raise ValueError("unknown op triple")


        OPS = {"double": double, "triple": triple}
        """
    )
    worker = JsonWorker(Path(sys.executable), tmp_path, source, "echo")
    try:
        assert worker("double", value=21) == {"value": 42}
        with pytest.raises(SystemExit, match="The echo side failed in 'triple':\n(.|\n)*unknown op triple"):
            worker("triple", value=1)
    finally:
        worker.close()
    assert worker.proc.returncode == 0
    assert "said by the peer library" in worker.log_path.read_text()
