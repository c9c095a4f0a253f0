"""The model card written next to the final model: YAML metadata plus a per-round table.

Example:
    >>> write_model_card(Path("final"), config, state, {"base": {...}, "final": {...}})  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..models import DEMO_MODEL_ID
from .config import PipelineConfig

__all__ = ["base_model_name", "write_model_card"]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _bias(metrics: dict) -> str:
    if "bias/score" not in metrics:
        return "-"
    return f"{metrics['bias/score']:.1f} [{metrics['bias/score_ci_low']:.1f}, {metrics['bias/score_ci_high']:.1f}]"


def base_model_name(config: PipelineConfig) -> str:
    """The name of the model the run started from, as the card and the pruning manifest give it.

    Example:
        >>> base_model_name(load_config(None, ["--model_path", "demo"]))  # doctest: +SKIP
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    return DEMO_MODEL_ID if config.model.model_path == "demo" else config.model.model_path


def write_model_card(folder: Path, config: PipelineConfig, state: dict[str, Any], speed: dict) -> Path:
    """Write ``folder/README.md``: base model, every round's pruning, healing, quality and bias numbers.

    ``speed`` holds ``tokens_per_second`` results of the base and the final model measured side by side.
    """
    base_model = base_model_name(config)
    baseline, rounds = state["baseline"], state["rounds"]
    base_speed, final_speed = speed["base"], speed["final"]
    speedup = {
        key: final_speed[key] / base_speed[key]
        for key in ("prefill_tokens_per_second", "decode_tokens_per_second")
        if base_speed.get(key) and final_speed.get(key)
    }
    metadata = {
        "base_model": base_model,
        "library_name": "transformers",
        "tags": ["optipfair-train", "pruned", "structured-pruning"],
        "optipfair_train": {
            "rounds": [
                {
                    "round": r["round"],
                    "pruning": [
                        {
                            k: v
                            for k, v in e.items()
                            if k
                            in (
                                "pruning_type",
                                "method",
                                "pruning_percentage",
                                "removed_layers",
                                "intermediate_sizes",
                                "parameters_before",
                                "parameters_after",
                                "target_parameters",
                            )
                        }
                        for e in r["events"]
                    ],
                    "heal_tokens": r["heal_tokens"],
                    "perplexity_pruned": r["pruned"]["perplexity"],
                    "perplexity_healed": r["healed"]["perplexity"],
                    "bias_score_healed": r["healed"].get("bias/score"),
                }
                for r in rounds
            ],
            "healing": {
                "method": config.heal.heal_method,
                "data": config.data.heal_data,
                "steps_per_round": config.heal.heal_steps,
                "learning_rate": config.heal.learning_rate,
                "lora_r": config.heal.lora_r,
                "kd_temperature": config.heal.kd_temperature,
                "kd_alpha": config.heal.kd_alpha,
            },
            "parameters": {
                "base": baseline["parameters"],
                "final": rounds[-1]["healed"]["parameters"] if rounds else baseline["parameters"],
            },
            "speedup": speedup,
        },
    }
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {base_model}, pruned and healed with optipfair-train",
        "",
        f"Perplexity on `{config.data.eval_data}` held-out text ({config.data.eval_tokens} tokens); activation bias "
        f"= mean activation difference over `{config.data.bias_pairs}` prompt pairs; behavioural score = % of "
        f"pairs where the stereotyped sentence is more likely (50 = no preference), 95% bootstrap interval.",
        "",
        "| stage | parameters | perplexity | activation bias | behavioural score |",
        "|---|---|---|---|---|",
        f"| base | {_fmt(baseline['parameters'])} | {_fmt(baseline['perplexity'])} | "
        f"{_fmt(baseline.get('bias/activation_mean_difference'), 4)} | {_bias(baseline)} |",
    ]
    for r in rounds:
        for stage in ("pruned", "healed"):
            m = r[stage]
            lines.append(
                f"| round {r['round']} {stage} | {_fmt(m['parameters'])} | {_fmt(m['perplexity'])} | "
                f"{_fmt(m.get('bias/activation_mean_difference'), 4)} | {_bias(m)} |"
            )
    lines += ["", "## What was pruned", ""]
    for r in rounds:
        for e in r["events"]:
            what = e.get("removed_layers") or e.get("intermediate_sizes", ["?"])[:1] or e.get("kept_kv_heads")
            lines.append(
                f"- round {r['round']}: {e['pruning_type']} by `{e['method']}` "
                f"({_fmt(e['parameters_before'])} -> {_fmt(e['parameters_after'])} parameters; {what})"
            )
    lines += [
        "",
        f"Healing: `{config.heal.heal_method}` on `{config.data.heal_data}`, "
        f"{config.heal.heal_steps} steps per round, "
        f"{sum(r['heal_tokens'] for r in rounds):,} tokens in all.",
        "",
    ]
    if speedup:
        lines.append(
            "Measured speed-up on this machine (greedy generation, batch 1): "
            + ", ".join(f"{k.replace('_tokens_per_second', '')} x{v:.2f}" for k, v in speedup.items())
            + "."
        )
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
