"""Command line: ``optipfair-train {demo,prune,analyze,run,probe,eval,search}`` (flags: :mod:`.cli_parser`).

Every command imports torch and transformers only once its arguments are checked, so ``--help`` and a
mistyped flag or value answer at once, before any model is loaded.

Example:
    $ optipfair-train prune --model-path demo --pruning-percentage 20 --output-dir ./pruned
    $ optipfair-train analyze --model-path ./pruned
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence

from .cli_parser import build_parser

logger = logging.getLogger(__name__)


def _calibration(args, tokenizer):
    from .data import calibration_dataloader, load_texts

    texts = load_texts(args.calibration_data, split="calibration")
    return calibration_dataloader(
        tokenizer, texts, num_samples=args.num_calibration_samples, seq_len=args.calibration_seq_len
    )


_NOT_STREAMED = (
    "target_parameters",
    "num_layers_to_remove",
    "depth_pruning_percentage",
    "layer_selection_method",
)


def _run_streamed(args) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from .models import demo_model_dir
    from .pruning import MANIFEST_NAME
    from .pruning.streamed import prune_checkpoint

    given = [f"--{k.replace('_', '-')}" for k in _NOT_STREAMED if getattr(args, k) is not None]
    if args.layer_allocation != "uniform":
        given.append("--layer-allocation")
    if given:
        raise ValueError(
            f"--streamed prunes uniformly by --pruning-percentage or --expansion-rate; drop {', '.join(given)}."
        )
    source = demo_model_dir() if args.model_path == "demo" else Path(args.model_path)
    if not source.is_dir():
        raise ValueError(
            f"--streamed reads a local model folder; {args.model_path!r} is not one (download a hub model first, "
            "e.g. huggingface-cli download NAME --local-dir DIR)."
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    out = prune_checkpoint(
        source,
        args.output_dir,
        _calibration(args, tokenizer),
        pruning_type=args.pruning_type,
        neuron_selection_method=args.neuron_selection_method,
        pruning_percentage=args.pruning_percentage,
        expansion_rate=args.expansion_rate,
        expansion_divisor=args.expansion_divisor,
        layer_indices=args.layer_indices,
        damping=args.damping,
        dtype=args.dtype,
        show_progress=not args.no_progress,
    )
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    event = manifest["history"][-1]
    print(f"Original parameters: {event['parameters_before']:,}")
    print(f"Pruned parameters:   {event['parameters_after']:,}")
    print(f"Saved to {out} (one block in memory at a time)")
    return 0


_TARGETS = (
    "pruning_percentage",
    "expansion_rate",
    "target_parameters",
    "num_layers_to_remove",
    "depth_pruning_percentage",
    "layer_indices",
)


def check_method(name: str | None) -> None:
    """Refuse an unknown neuron scorer before a model is loaded (the registry, custom scorers included)."""
    from .pruning import available_scorers

    known = {m.upper() for m in available_scorers()} | {"PPM", "ACTIVATION_L2", "PCA"}  # aliases, HIDDEN
    if name is not None and name.upper() not in known:
        raise ValueError(
            f"unknown --neuron-selection-method {name!r}; choose from {', '.join(available_scorers())} "
            "(HIDDEN also takes activation_l2 and pca)"
        )


def _check_prune(args) -> None:
    """What ``prune`` will do, refused or said before the model loads."""
    if args.output_dir is None:
        raise ValueError("prune needs --output-dir DIR (the folder the pruned model is saved to).")
    if not any(getattr(args, k) is not None for k in _TARGETS):
        raise ValueError(
            "prune needs a target: --pruning-percentage P (MLP neurons, heads or channels), --expansion-rate, "
            "--target-parameters, or for DEPTH --num-layers-to-remove / --depth-pruning-percentage / "
            "--layer-indices."
        )
    check_method(args.neuron_selection_method)
    given = ", ".join(f"{k}={getattr(args, k)}" for k in _TARGETS if getattr(args, k) is not None)
    method = args.neuron_selection_method or "the default (hybrid with calibration data)"
    print(f"Pruning {args.pruning_type} of {args.model_path}: {given}, method {method}.", flush=True)


def _run_prune(args) -> int:
    _check_prune(args)
    from .models import load_model_and_tokenizer
    from .pruning import prune_model, save_pruned_model

    if args.streamed:
        return _run_streamed(args)
    model, tokenizer = load_model_and_tokenizer(args.model_path, dtype=args.dtype, device=args.device)
    options = {
        k: getattr(args, k)
        for k in (
            "neuron_selection_method",
            "pruning_percentage",
            "expansion_rate",
            "expansion_divisor",
            "target_parameters",
            "num_layers_to_remove",
            "depth_pruning_percentage",
            "layer_selection_method",
            "layer_indices",
            "layer_allocation",
            "reconstruct",
            "damping",
            "sequential",
        )
    }
    _, stats = prune_model(
        model,
        pruning_type=args.pruning_type,
        dataloader=_calibration(args, tokenizer),
        show_progress=not args.no_progress,
        return_stats=True,
        **options,
    )
    save_pruned_model(model, args.output_dir, tokenizer=tokenizer)
    print(f"Original parameters: {stats['original_parameters']:,}")
    print(f"Pruned parameters:   {stats['pruned_parameters']:,}")
    print(f"Reduction:           {stats['reduction']:,} ({stats['percentage_reduction']:.2f}%)")
    print(f"Saved to {args.output_dir}")
    return 0


def _run_analyze(args) -> int:
    from .analysis import analyze
    from .models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(args.model_path, dtype=args.dtype, device=args.device)
    report = analyze(model)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    sizes = report["intermediate_sizes"]
    width = str(sizes[0]) if len(set(sizes)) == 1 else f"{min(sizes)}..{max(sizes)} (per layer)"
    print(f"Family:            {report['family']} ({report['model_type']})")
    print(f"Layers:            {report['num_layers']}")
    print(f"Hidden size:       {report['hidden_size']}")
    print(f"MLP width:         {width}  (expansion ratio {report['expansion_ratio']:.1f}%)")
    print(
        f"Attention heads:   {report['num_attention_heads']} query, {report['num_key_value_heads']} key/value, "
        f"head_dim {report['head_dim']}"
    )
    print(f"Parameters:        {report['total_parameters']:,}")
    for name, part in report["parameter_distribution"].items():
        print(f"  {name:<16} {part['parameters']:>14,}  {part['percentage']:6.2f}%")
    return 0


def _run_demo(args) -> int:
    check_method(args.neuron_selection_method)  # before the base model is measured
    from .analysis import count_parameters
    from .data import load_texts
    from .evaluation import greedy_generate, perplexity
    from .models import load_model_and_tokenizer
    from .pruning import prune_model, save_pruned_model

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("demo")
    eval_texts = load_texts(args.eval_data, split="evaluation")
    prompt = "The capital of France is"
    progress = not args.no_progress

    def measure(label: str) -> dict:
        return {
            "model": label,
            "parameters": count_parameters(model),
            "perplexity": perplexity(
                model, tokenizer, eval_texts, seq_len=512, max_tokens=args.eval_tokens, show_progress=progress
            ),
            "sample": greedy_generate(model, tokenizer, prompt, max_new_tokens=12).strip(),
        }

    rows = [measure("base")]
    _, stats = prune_model(
        model,
        neuron_selection_method=args.neuron_selection_method,
        pruning_percentage=args.pruning_percentage,
        dataloader=_calibration(args, tokenizer),
        show_progress=progress,
        return_stats=True,
    )
    rows.append(measure(f"MLP -{args.pruning_percentage:g}% ({args.neuron_selection_method})"))
    save_pruned_model(model, args.output_dir, tokenizer=tokenizer)

    print(
        f"\n| model | parameters | perplexity ({args.eval_data} text, {args.eval_tokens} tokens) | "
        f"greedy answer to {prompt!r} |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['parameters']:,} | {row['perplexity']:.2f} | {row['sample']!r} |")
    print(
        f"\nParameters removed: {stats['reduction']:,} ({stats['percentage_reduction']:.2f}%). "
        f"Pruned model saved to {args.output_dir} ({time.perf_counter() - start:.0f} s)."
    )
    return 0


def _run_pipeline(config_path: str | None, overrides: list[str]) -> int:
    from .pipeline import PruneThenHeal, load_config

    if config_path is None:  # a default run prunes and heals the demo model for many minutes
        raise ValueError(
            "run needs --config FILE (flags after it override its keys). To run the offline demo: "
            "optipfair-train run --config configs/demo.yaml"
        )
    pipeline = PruneThenHeal(load_config(config_path, overrides))
    result = pipeline.run()
    if result["already_finished"]:
        print(f"{result['final_dir']} holds a finished run with these settings; nothing was redone.")
    print("\n".join(run_verdict(pipeline)))
    return 0


def run_verdict(pipeline) -> list[str]:
    """The finished pipeline's verdict lines and where its files are (the console's last lines)."""
    from .pipeline.card import card_inputs
    from .pipeline.verdict import run_files, verdict_lines

    card = card_inputs(pipeline.config, pipeline.state, pipeline.state.speed)
    return verdict_lines(card, run_files(pipeline.out))


def _run_search(args) -> int:
    from .pruning.search_cli import run_search

    return run_search(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optipfair-train`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # only its flags are built
    parser = build_parser(command or "")  # no command (top-level --help): no command's flags
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "probe":
        from .bias.cli import run_probe

        return run_probe(args)
    if args.command == "eval":
        from .zeroshot.cli import run_eval

        return run_eval(args)
    runners = {"demo": _run_demo, "prune": _run_prune, "analyze": _run_analyze, "search": _run_search}
    try:
        if args.command == "run":
            return _run_pipeline(args.config, extra)
        return runners[args.command](args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
