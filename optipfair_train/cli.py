"""Command line: ``optipfair-train {demo,prune,analyze,probe,eval,run}``.

Example:
    $ optipfair-train prune --model-path demo --pruning-percentage 20 --output-path ./pruned
    $ optipfair-train analyze --model-path ./pruned
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from .pruning import LAYER_SELECTION_METHODS, MANIFEST_NAME, PRUNING_TYPES, available_scorers
from .pruning.reconstruction import DEFAULT_DAMPING

logger = logging.getLogger(__name__)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path",
        default="demo",
        help="'demo' (SmolLM2-135M-Instruct, offline), a local folder or a hub name",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration-data",
        default="demo",
        help="'demo', a .txt/.jsonl/.csv file, or a datasets name (name[:config])",
    )
    parser.add_argument("--num-calibration-samples", type=int, default=8)
    parser.add_argument("--calibration-seq-len", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruning-type", default="MLP_GLU", choices=PRUNING_TYPES)
    parser.add_argument(
        "--method",
        dest="neuron_selection_method",
        default=None,
        help=f"neuron scorer: {', '.join(available_scorers())} (default: hybrid; activation with --sequential); "
        "for HIDDEN: activation (default), activation_l2, L2, pca",
    )
    parser.add_argument("--pruning-percentage", type=float, default=None)
    parser.add_argument("--expansion-rate", type=float, default=None)
    parser.add_argument("--expansion-divisor", type=int, default=None)
    parser.add_argument("--target-parameters", type=int, default=None)
    parser.add_argument("--layer-allocation", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--num-layers-to-remove", type=int, default=None)
    parser.add_argument("--depth-pruning-percentage", type=float, default=None)
    parser.add_argument("--layer-selection-method", default=None, choices=LAYER_SELECTION_METHODS)
    parser.add_argument("--layer-indices", type=int, nargs="+", default=None)
    parser.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the kept down_proj / o_proj columns on the calibration data",
    )
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING, help="ridge damping of the refit")
    parser.add_argument("--sequential", action="store_true", help="with --reconstruct: layer by layer")
    parser.add_argument(
        "--streamed",
        action="store_true",
        help="prune a local safetensors folder one block at a time and save it shard by shard (models larger "
        "than memory; implies --reconstruct --sequential; MLP/MLP_GLU/ATTENTION)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``optipfair-train`` command."""
    from .bias.cli import add_probe_arguments

    parser = argparse.ArgumentParser(prog="optipfair-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune the offline demo model and report quality before/after")
    _add_data_arguments(demo)
    demo.add_argument("--pruning-percentage", type=float, default=20.0)
    demo.add_argument("--method", dest="neuron_selection_method", default="activation")
    demo.add_argument("--eval-data", default="demo", help="text for perplexity (never the calibration text)")
    demo.add_argument("--eval-tokens", type=int, default=8 * 512)
    demo.add_argument("--output-dir", default="outputs/demo-pruned")

    prune = sub.add_parser("prune", help="prune a model once and save it")
    _add_model_arguments(prune)
    _add_data_arguments(prune)
    _add_pruning_arguments(prune)
    prune.add_argument("--output-path", required=True)

    analyze = sub.add_parser("analyze", help="architecture and parameter distribution")
    _add_model_arguments(analyze)
    analyze.add_argument("--json", action="store_true", help="print the full report as JSON")

    run = sub.add_parser("run", help="the prune-then-heal pipeline; flags after --config override its keys")
    run.add_argument(
        "--config", default=None, help="YAML file of pipeline settings (required; see configs/demo.yaml)"
    )

    probe = sub.add_parser("probe", help="bias probes: activation differences and behavioural scores")
    add_probe_arguments(probe)

    from .zeroshot.cli import add_eval_arguments

    add_eval_arguments(
        sub.add_parser("eval", help="perplexity, zero-shot accuracy and StereoSet of any model")
    )
    return parser


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
        args.output_path,
        _calibration(args, tokenizer),
        pruning_type=args.pruning_type,
        neuron_selection_method=args.neuron_selection_method or "activation",
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


def _run_prune(args) -> int:
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
    save_pruned_model(model, args.output_path, tokenizer=tokenizer)
    print(f"Original parameters: {stats['original_parameters']:,}")
    print(f"Pruned parameters:   {stats['pruned_parameters']:,}")
    print(f"Reduction:           {stats['reduction']:,} ({stats['percentage_reduction']:.2f}%)")
    print(f"Saved to {args.output_path}")
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

    card = card_inputs(pipeline.config, pipeline.state, pipeline.state.get("speed"))
    return verdict_lines(card, run_files(pipeline.out))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optipfair-train`` command."""
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "run":
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "probe":
        from .bias.cli import run_probe

        return run_probe(args)
    if args.command == "eval":
        from .zeroshot.cli import run_eval

        return run_eval(args)
    runners = {"demo": _run_demo, "prune": _run_prune, "analyze": _run_analyze}
    try:
        if args.command == "run":
            return _run_pipeline(args.config, extra)
        return runners[args.command](args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
