"""DEPTH pruning with a linear replacement folded into the previous block's down projection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from optipfair_train import prune_model
from optipfair_train.arch import get_adapter
from optipfair_train.pruning import as_batches
from optipfair_train.pruning.depth_replace import _solve, fit_linear_replacement

PROMPT = torch.tensor([[5, 17, 33, 60, 8, 41, 77, 12]])
REPLACE_FAMILIES = ["llama", "qwen3", "gpt2", "opt", "phi"]


def _model(family: str, layers: int = 6, seed: int = 0):
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return make_tiny_model(family, seed=seed, **{key: layers})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _down_io(model, layer: int, batch) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Real-token rows of block ``layer``'s down-projection output, its block output, and all hidden states."""
    adapter = get_adapter(model)
    seen = {}
    handles = [
        adapter.mlp(layer).down.register_forward_hook(lambda m, a, o: seen.__setitem__("m", o)),
        adapter.layers[layer].register_forward_hook(
            lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].reshape(-1).bool()
    d = adapter.hidden_size
    rows = [t.reshape(-1, d)[mask].double() for t in (seen["m"], seen["out"])]
    return rows[0], rows[1], [h.reshape(-1, d)[mask].double() for h in hidden]


@pytest.mark.parametrize("family", REPLACE_FAMILIES)
def test_replacement_reloads_with_from_pretrained_and_generates_with_cache(family, calibration_batches, tmp_path):
    model = _model(family)
    _, stats = prune_model(
        model, pruning_type="DEPTH", num_layers_to_remove=2, replace_with_linear=True,
        dataloader=calibration_batches, show_progress=False, return_stats=True,
    )
    fit = stats["event"]["linear_replacement"]
    start = stats["event"]["removed_layers"][0]
    assert start >= 1 and stats["event"]["removed_layers"] == [start, start + 1]
    assert fit["folded_into_layer"] == start - 1 and fit["replaced_layers"] == [start, start + 1]
    assert fit["relative_error"] < fit["relative_error_without_map"]
    history = model.config.pruning_history
    assert history[-1]["linear_replacement"] == fit
    down = {"gpt2": f"transformer.h.{start - 1}.mlp.c_proj", "opt": f"model.decoder.layers.{start - 1}.fc2",
            "phi": f"model.layers.{start - 1}.mlp.fc2"}
    assert fit["folded_into"] == down.get(family, f"model.layers.{start - 1}.mlp.down_proj")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert get_adapter(reloaded).num_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=PROMPT).logits, model(input_ids=PROMPT).logits)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        cached = reloaded.generate(PROMPT, use_cache=True, **kwargs)
        uncached = reloaded.generate(PROMPT, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_folded_down_projection_outputs_the_mapped_output(family, calibration_batches):
    """After folding, block i's down projection outputs M @ T exactly (bias and Conv1D layout included)."""
    model = _model(family)
    batches = as_batches(calibration_batches)
    reference_m, _, _ = _down_io(model, 1, batches[0])
    fit = fit_linear_replacement(model, batches, [2, 3], damping=1e-2)
    _, stats = prune_model(
        model, pruning_type="DEPTH", layer_selection_method="custom", layer_indices=[2, 3],
        replace_with_linear=True, linear_damping=1e-2, dataloader=batches, show_progress=False, return_stats=True,
    )
    pruned_m, _, _ = _down_io(model, 1, batches[0])
    torch.testing.assert_close(pruned_m, reference_m @ fit.transform, rtol=1e-4, atol=1e-5)
    assert stats["event"]["linear_replacement"]["folded_into_layer"] == 1


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_fit_equals_lstsq_on_the_hidden_states(family, calibration_batches):
    """Damping 0: T equals torch.linalg.lstsq of (L - Y) on M over the real tokens of every batch."""
    model = _model(family)
    batches = as_batches(calibration_batches)
    ms, targets = [], []
    for batch in batches:
        m, out, hidden = _down_io(model, 1, batch)
        ms.append(m)
        targets.append(hidden[4] - (out - m))  # hidden_states[4] is the output of block 3
    expected = torch.linalg.lstsq(torch.cat(ms), torch.cat(targets)).solution
    fit = fit_linear_replacement(model, batches, [2, 3], damping=0.0)
    torch.testing.assert_close(fit.transform, expected, rtol=1e-6, atol=1e-6)


def test_solver_matches_lstsq_with_and_without_damping():
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    r = torch.randn(300, 16, dtype=torch.float64)
    gram, cross = x.T @ x, x.T @ r
    torch.testing.assert_close(_solve(gram, cross, 0.0, 300), torch.linalg.lstsq(x, r).solution)
    lam = 0.1 * float(gram.diagonal().sum()) / 16
    eye = torch.eye(16, dtype=torch.float64)
    # ridge toward identity = least squares on rows stacked with sqrt(lam) * (I -> I)
    augmented = torch.linalg.lstsq(torch.cat([x, lam**0.5 * eye]), torch.cat([r, lam**0.5 * eye])).solution
    torch.testing.assert_close(_solve(gram, cross, 0.1, 300), augmented)


def _silence(model, layers) -> None:
    adapter = get_adapter(model)
    with torch.no_grad():
        for i in layers:
            adapter.attention(i).o.weight.zero_()
            adapter.mlp(i).down.weight.zero_()


def test_identity_blocks_give_the_identity_map_and_unchanged_logits(calibration_batches):
    """Removed blocks that are identities: the fitted map is I and the logits do not change."""
    model = _model("mistral")
    _silence(model, [3, 4])
    with torch.no_grad():
        before = model(input_ids=PROMPT).logits
    batches = as_batches(calibration_batches)
    fit = fit_linear_replacement(model, batches, [3, 4], damping=0.0)
    torch.testing.assert_close(fit.transform, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-6)
    assert fit.relative_error < 1e-6
    _, stats = prune_model(
        model, pruning_type="DEPTH", num_layers_to_remove=2, replace_with_linear=True, linear_damping=0.0,
        dataloader=batches, show_progress=False, return_stats=True,
    )
    assert stats["event"]["removed_layers"] == [3, 4] and stats["event"]["method"] == "contiguous"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROMPT).logits, before, rtol=1e-5, atol=1e-5)


def test_contiguous_selection_skips_a_run_at_block_zero(calibration_batches):
    """Blocks 0-1 are identities: plain contiguous removal takes them; with a replacement (nothing to fold
    into before block 0) the run must start at block 1 or later."""
    batches = as_batches(calibration_batches)
    results = []
    for replace in (None, True):
        model = _model("llama")
        _silence(model, [0, 1])
        _, stats = prune_model(
            model, pruning_type="DEPTH", num_layers_to_remove=2, layer_selection_method="contiguous",
            replace_with_linear=replace, dataloader=batches, show_progress=False, return_stats=True,
        )
        results.append(stats["event"]["removed_layers"])
    assert results[0] == [0, 1]
    assert results[1][0] >= 1 and len(results[1]) == 2


def test_padding_changes_nothing(tokenizer):
    texts = ["Short one.", "A much longer calibration sentence with many more characters in it."]
    padded = [dict(tokenizer(texts, padding=True, return_tensors="pt"))]
    single = [dict(tokenizer([t], return_tensors="pt")) for t in texts]
    assert int(padded[0]["attention_mask"].sum()) < padded[0]["attention_mask"].numel()
    model = _model("llama").double()  # float64, so batch shape does not change the rounding
    a = fit_linear_replacement(model, as_batches(padded), [2, 3], damping=1e-3)
    b = fit_linear_replacement(model, as_batches(single), [2, 3], damping=1e-3)
    assert a.tokens == b.tokens == sum(len(t) for t in texts)
    torch.testing.assert_close(a.transform, b.transform, rtol=1e-9, atol=1e-10)


def _rank_one_down(model, layer: int) -> None:
    down = get_adapter(model).mlp(layer).down
    with torch.no_grad():
        down.weight.copy_(torch.outer(torch.randn(down.weight.shape[0]), torch.randn(down.weight.shape[1])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_selection_method="custom", layer_indices=[2, 3]), "pass dataloader"),
        (dict(layer_selection_method="custom", layer_indices=[0, 1], dataloader="batches"), "block 0"),
        (dict(layer_selection_method="custom", layer_indices=[2, 4], dataloader="batches"), "consecutive"),
        (dict(layer_selection_method="importance", num_layers_to_remove=2, dataloader="planted"), "consecutive"),
        (dict(layer_selection_method="custom", layer_indices=[2, 3], dataloader="few", linear_damping=0.0),
         "at least hidden_size=64"),
        (dict(layer_selection_method="custom", layer_indices=[2, 3], dataloader="batches", linear_damping=0.0,
              rank_one=True), "ill-conditioned"),
        (dict(layer_selection_method="custom", layer_indices=[2, 3], dataloader="batches", linear_damping=-1.0),
         "linear_damping must be >= 0"),
    ],
)
def test_bad_input_raises_before_any_weight_changes(kwargs, message, calibration_batches, tokenizer):
    model = _model("llama")
    if kwargs.pop("rank_one", False):
        _rank_one_down(model, 1)
    if kwargs.get("dataloader") == "planted":
        _silence(model, [1, 4])  # importance then picks two separate blocks
    data = {"batches": calibration_batches, "planted": calibration_batches,
            "few": [dict(tokenizer(["Too few tokens."], return_tensors="pt"))]}
    if "dataloader" in kwargs:
        kwargs["dataloader"] = data[kwargs["dataloader"]]
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        prune_model(model, pruning_type="DEPTH", replace_with_linear=True, show_progress=False, **kwargs)
    _assert_unchanged(model, before)
    assert get_adapter(model).num_layers == 6


def test_gemma2_is_refused(calibration_batches):
    model = make_tiny_model("gemma2", num_hidden_layers=4)
    before = _state(model)
    with pytest.raises(ValueError, match="gemma2"):
        prune_model(model, pruning_type="DEPTH", num_layers_to_remove=1, replace_with_linear=True,
                    dataloader=calibration_batches, show_progress=False)
    _assert_unchanged(model, before)
