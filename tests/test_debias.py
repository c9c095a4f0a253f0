"""Bias-subspace projection folded into the weights: exact removal, planted subspace, reload, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train.arch import get_adapter
from optipfair_train.bias.debias import BiasSubspace, debias_model, estimate_bias_subspace, project_out_bias

PAIRS = [
    ("He is a nurse.", "She is a nurse."),
    ("The man was kind.", "The woman was kind."),
    ("His job is hard.", "Her job is hard."),
    ("A boy ran home.", "A girl ran home."),
]


def _stream_states(model, tokenizer, texts) -> list[torch.Tensor]:
    """The embedding output and every block's output (the residual stream), each [B, S, H]."""
    adapter = get_adapter(model)
    states = []
    handles = [adapter.model.get_input_embeddings().register_forward_hook(lambda m, a, o: states.append(o))]
    for layer in adapter.layers:
        handles.append(
            layer.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
        )
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return states


def _random_subspace(hidden: int, k: int, layers=(0, 1), seed: int = 0) -> BiasSubspace:
    q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=torch.Generator().manual_seed(seed)))
    return BiasSubspace(q.T.contiguous(), tuple(layers), (0.5,) * k, 4)


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "gpt2", "opt", "phi"])
def test_stream_never_carries_the_directions(family, tokenizer):
    model = make_tiny_model(family)
    subspace = _random_subspace(64, 2)
    before = _stream_states(model, tokenizer, [p[0] for p in PAIRS])
    record = project_out_bias(model, subspace)
    after = _stream_states(model, tokenizer, [p[0] for p in PAIRS])
    v = subspace.directions
    for h_before, h_after in zip(before, after, strict=True):
        assert (h_before @ v.T).abs().max() > 1e-2  # the directions were there
        # the component along V is zero at every position of every block, relative to the stream's scale
        assert (h_after @ v.T).abs().max() < 1e-5 * h_after.abs().max().clamp_min(1)
    assert record["k"] == 2 and record["scope"] == "stream"
    assert model.config.debias_history[-1] == record


def test_pair_hidden_states_equal_along_estimated_direction(tokenizer):
    model = make_tiny_model("llama")
    subspace = estimate_bias_subspace(model, tokenizer, PAIRS, layers=[1, 2], k=1)
    v = subspace.directions[0]
    assert torch.isclose(v.norm(), torch.tensor(1.0), atol=1e-5)
    first = _stream_states(model, tokenizer, [p[0] for p in PAIRS])
    second = _stream_states(model, tokenizer, [p[1] for p in PAIRS])
    gap_before = (first[2].mean(1) @ v - second[2].mean(1) @ v).abs().max()
    project_out_bias(model, subspace)
    first = _stream_states(model, tokenizer, [p[0] for p in PAIRS])
    second = _stream_states(model, tokenizer, [p[1] for p in PAIRS])
    assert gap_before > 1e-2
    for a, b in zip(first, second, strict=True):
        assert (a.mean(1) @ v - b.mean(1) @ v).abs().max() < 1e-5 * max(1.0, float(a.abs().max()))


def test_planted_subspace_is_recovered_and_removed(tokenizer):
    """Tokens 'X' and 'Y' differ only along a planted direction: the estimate finds it, the fold removes it."""
    model = make_tiny_model("llama")
    emb = model.get_input_embeddings().weight
    planted = torch.nn.functional.normalize(
        torch.randn(64, generator=torch.Generator().manual_seed(3)), dim=0
    )
    x, y = tokenizer.convert_tokens_to_ids(["X", "Y"])
    with torch.no_grad():
        for i in range(4):  # blocks that write little, so what the stream carries is the embeddings' doing
            model.model.layers[i].self_attn.o_proj.weight.mul_(0.02)
            model.model.layers[i].mlp.down_proj.weight.mul_(0.02)
        emb -= (emb @ planted)[:, None] * planted  # no token carries the planted direction...
        emb[y] = emb[x]
        emb[x] += 4.0 * planted  # ...except X (+) and Y (-), otherwise identical
        emb[y] -= 4.0 * planted
    pairs = [(f"The {w} was X today.", f"The {w} was Y today.") for w in ("cat", "dog", "man", "sun", "car")]
    subspace = estimate_bias_subspace(model, tokenizer, pairs, layers=[0], k=1)
    assert abs(float(subspace.directions[0] @ planted)) > 0.9
    assert subspace.explained[0] > 0.5

    def pair_gap() -> float:
        a = _stream_states(model, tokenizer, [p[0] for p in pairs])[1]
        b = _stream_states(model, tokenizer, [p[1] for p in pairs])[1]
        return float((a - b).norm())

    before = pair_gap()
    project_out_bias(model, BiasSubspace(planted[None], (0,), (1.0,), len(pairs)))
    weight = model.get_input_embeddings().weight
    assert torch.allclose(weight[x], weight[y], atol=1e-6)
    assert before > 1.0 and pair_gap() < 1e-5  # X and Y are now the same token to the model


def test_strength_scales_the_embedding_component():
    model = make_tiny_model("llama")
    subspace = _random_subspace(64, 1)
    v = subspace.directions[0]
    before = model.get_input_embeddings().weight @ v
    project_out_bias(model, subspace, strength=0.25)
    after = model.get_input_embeddings().weight @ v
    assert torch.allclose(after, 0.75 * before, atol=1e-5)


def test_layers_scope_projects_only_those_blocks_writes():
    model = make_tiny_model("llama")
    reference = {k: p.clone() for k, p in model.state_dict().items()}
    project_out_bias(model, _random_subspace(64, 1, layers=(2,)), scope="layers")
    changed = {k for k, p in model.state_dict().items() if not torch.equal(p, reference[k])}
    assert changed == {"model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"}


@pytest.mark.parametrize("family", ["llama-tied", "gpt2"])
def test_reload_with_plain_from_pretrained_gives_equal_logits(family, tokenizer, tmp_path):
    model = make_tiny_model(family)
    debias_model(model, tokenizer, PAIRS, k=2, layers=[1, 3])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = tokenizer([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert reloaded.config.debias_history == model.config.debias_history
    assert reloaded.config.debias_history[0]["layers"] == [1, 3]


def test_untied_head_is_left_alone():
    model = make_tiny_model("llama")
    head = model.lm_head.weight.clone()
    project_out_bias(model, _random_subspace(64, 1))
    assert torch.equal(model.lm_head.weight, head)
    assert model.config.debias_history[-1]["tied_head_projected"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="inlp"), "method"),
        (dict(k=0), "k must"),
        (dict(k=65), "k must"),
        (dict(strength=0), "strength"),
        (dict(strength=1.5), "strength"),
        (dict(strength=float("nan")), "strength"),
        (dict(scope="heads"), "scope"),
        (dict(layers=[7]), "layers"),
    ],
)
def test_bad_settings_refused_before_any_weight_changes(kwargs, message, tokenizer):
    model = make_tiny_model("llama")
    reference = {k: p.clone() for k, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        debias_model(model, tokenizer, PAIRS, **kwargs)
    assert all(torch.equal(p, reference[k]) for k, p in model.state_dict().items())
    assert not getattr(model.config, "debias_history", None)


def test_empty_or_malformed_pair_file_named(tokenizer, tmp_path):
    model = make_tiny_model("llama")
    reference = {k: p.clone() for k, p in model.state_dict().items()}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt1": "He ran."}) + "\n")
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text('{"prompt1": "He ran.", "prompt2": "She ran."}\n{oops\n')
    for path, message in ((empty, "no prompt pairs"), (broken, "line 1"), (not_json, "line 2")):
        with pytest.raises(ValueError, match=message) as err:
            debias_model(model, tokenizer, str(path))
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        debias_model(model, tokenizer, str(tmp_path / "missing.jsonl"))
    assert all(torch.equal(p, reference[k]) for k, p in model.state_dict().items())


def test_bad_subspace_and_family_refused():
    model = make_tiny_model("llama")
    reference = {k: p.clone() for k, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\[k, 64\]"):
        project_out_bias(model, BiasSubspace(torch.eye(32)[:1], (0,), (1.0,), 1))
    with pytest.raises(ValueError, match="orthonormal"):
        project_out_bias(model, BiasSubspace(2 * torch.eye(64)[:1], (0,), (1.0,), 1))
    assert all(torch.equal(p, reference[k]) for k, p in model.state_dict().items())
    with pytest.raises(ValueError, match="gemma2"):
        project_out_bias(make_tiny_model("gemma2"), _random_subspace(64, 1))


def test_centered_fold_holds_the_stream_at_the_mean_component(tokenizer):
    model = make_tiny_model("llama-tied")
    subspace = estimate_bias_subspace(model, tokenizer, PAIRS, layers=[1, 2], k=2)
    assert subspace.mean is not None and subspace.mean.shape == (64,)
    level = subspace.directions @ subspace.mean  # what every position keeps along V
    record = project_out_bias(model, subspace, center=True)
    assert record["offset"] == pytest.approx(level.tolist(), abs=1e-5)
    for h in _stream_states(model, tokenizer, [p[0] for p in PAIRS] + [p[1] for p in PAIRS]):
        assert torch.allclose(h @ subspace.directions.T, level.expand(*h.shape[:2], 2), atol=1e-4)
    uncentered = make_tiny_model("llama-tied")
    assert project_out_bias(uncentered, subspace)["offset"] == [0.0, 0.0]
    for h in _stream_states(uncentered, tokenizer, [p[0] for p in PAIRS]):
        assert (h @ subspace.directions.T).abs().max() < 1e-4
