"""``optipfair-train search``: load the model and the texts, run :func:`~optipfair_train.pruning.search.search`,
write the table (``search.json``, ``search.md``) and the chosen plan (``plan/``), print the table and the
choice. Its flags are built in :mod:`optipfair_train.cli_parser_measure` (no torch there).

The search state (``search-state.json``) lives in the output folder, so a rerun of the same command
resumes after the last finished candidate.

Example:
    $ optipfair-train search demo --fraction 0.25 --candidates mlp=1 hidden=0.25,mlp=0.75 --output-dir out
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["run_search"]


def run_search(args: argparse.Namespace) -> int:
    """Run the search the parsed ``args`` describe; 0 on success (bad input raises ``ValueError``)."""
    from ..data import calibration_dataloader, load_texts, tokenize_for_lm
    from ..models import load_model_and_tokenizer
    from .search import search, shares_text

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; give a folder.")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    calibration_texts = load_texts(args.calibration_data, split="calibration")
    calibration = calibration_dataloader(
        tokenizer,
        calibration_texts,
        num_samples=args.num_calibration_samples,
        seq_len=args.calibration_seq_len,
    )
    seq_len = min(args.eval_seq_len, args.eval_tokens)
    eval_blocks = tokenize_for_lm(
        tokenizer,
        load_texts(args.eval_data, split="evaluation"),
        seq_len=seq_len,
        num_sequences=max(1, args.eval_tokens // seq_len),
    )
    distill = None
    if args.distill_steps:  # 4 blocks a step, from the calibration text
        distill = tokenize_for_lm(
            tokenizer,
            calibration_texts,
            seq_len=args.calibration_seq_len,
            num_sequences=4 * args.distill_steps,
        )
    result = search(
        model,
        args.target_parameters,
        fraction=args.fraction,
        candidates=args.candidates,
        calibration=calibration,
        eval_batches=eval_blocks,
        reconstruct=args.reconstruct,
        distill_steps=args.distill_steps,
        distill_top=args.distill_top,
        distill_data=distill,
        seed=args.seed,
        state_path=out / "search-state.json",
        show_progress=not args.no_progress,
    )
    result.save(out)
    print(result.markdown())
    chosen = result.rows[result.chosen]
    print(
        f"Chosen: {shares_text(chosen['shares'])} ({chosen['parameters']:,} parameters, {result.ranked_by} "
        f"{chosen[result.ranked_by]:.2f}); pipeline: budget_shares: {shares_text(chosen['shares'])}"
    )
    print(f"Wrote {out / 'search.md'}, {out / 'search.json'} and the plan in {out / 'plan'}")
    return 0
