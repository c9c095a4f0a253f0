"""Helpers for the callback tests: tiny LM datasets and TrainingArguments for seconds-long CPU runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainingArguments

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CROWS_CSV = SHARED_DATA / "crows-pairs" / "crows_pairs_anonymized.csv"

NEUTRAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes whole neurons, heads or blocks from a network.",
    "A small model can still answer simple questions well.",
    "Paris is the capital of France and a large city.",
    "Calibration text decides which units matter most.",
    "The river flows through the valley to the sea.",
    "Tables and chairs stand in the quiet room.",
    "Numbers are added and multiplied in order.",
]


class TextDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM examples (``input_ids``, ``attention_mask``, ``labels`` with -100 on padding)."""

    def __init__(self, tokenizer, texts: list[str], length: int = 48, repeat: int = 1):
        self.items = []
        for text in list(texts) * repeat:
            enc = tokenizer(
                text, truncation=True, max_length=length, padding="max_length", return_tensors="pt"
            )
            ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
            self.items.append(
                {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def training_args(output_dir, **overrides) -> TrainingArguments:
    """CPU arguments for a few-step run: no saving, no reporting, log every step, plain AdamW."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=6,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        optim="adamw_torch",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def optimizer_state_matches(optimizer) -> list[str]:
    """Names of problems: state tensors whose shape differs from their parameter's (empty = all good)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    problems = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    problems.append(f"{key}: {tuple(value.shape)} vs {tuple(p.shape)}")
    return problems


def optimizer_params(optimizer) -> set[int]:
    opt = getattr(optimizer, "optimizer", optimizer)
    return {id(p) for g in opt.param_groups for p in g["params"]}


def logged(trainer, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every log_history entry that has ``key``."""
    return [(e["step"], e[key]) for e in trainer.state.log_history if key in e]


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits are a table row of the previous token: log-probs by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        )

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])
