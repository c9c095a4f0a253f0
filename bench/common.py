"""What every benchmark shares: flags, the workload (model, WikiText-2, CrowS-Pairs), quality measures
and the report (a markdown file with the machine and date, plus PNG plots).

Every script takes the same base flags::

    --quick              a few minutes instead of up to 30 (fewer tokens, fewer settings)
    --model-path PATH    'demo' (default, SmolLM2-135M-Instruct from the wheel), a folder or a hub name
    --data DIR           folder with wikitext-2/ and crows-pairs/ (default ../shared/data, or
                         $OPTIPFAIR_TRAIN_DATA)
    --out DIR            where <name>.md and the plots go (default docs/benchmarks)
    --threads N          torch threads (default: all cores)

WikiText-2 ``valid.txt`` is calibration and healing text; ``test.txt`` is only ever scored.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from optipfair_train.analysis import count_parameters
from optipfair_train.bias import behavioural_bias_score, load_crows_pairs
from optipfair_train.data import calibration_dataloader, load_texts, tokenize_for_lm
from optipfair_train.evaluation import perplexity
from optipfair_train.models import load_model_and_tokenizer
from optipfair_train.pruning import as_batches

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("OPTIPFAIR_TRAIN_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_OUT = ROOT / "docs" / "benchmarks"


def base_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer tokens and settings")
    parser.add_argument("--model-path", default="demo")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(args: argparse.Namespace) -> None:
    """Threads and seeds; check the data folder exists (say how to point at another one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)  # reports and partial tables are written as rows finish
    wikitext = args.data / "wikitext-2"
    if not (wikitext / "test.txt").is_file() or not (wikitext / "valid.txt").is_file():
        raise SystemExit(
            f"No WikiText-2 under {args.data} (expected wikitext-2/valid.txt and test.txt); "
            "pass --data DIR or set OPTIPFAIR_TRAIN_DATA."
        )


@dataclass
class Workload:
    """The model under test and the fixed text it is measured on."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    test_ids: torch.Tensor  # [N, eval_seq_len] blocks of WikiText-2 test
    calibration: list[dict[str, torch.Tensor]]  # batches of WikiText-2 valid
    crows_pairs: list = field(default_factory=list)
    crows_sample: int | None = None  # pairs scored (None: all 1,508)
    eval_seq_len: int = 512
    seed: int = 0

    @property
    def eval_tokens(self) -> int:
        return self.test_ids.numel()

    def valid_texts(self, data: Path) -> list[str]:
        return load_texts(str(data / "wikitext-2" / "valid.txt"))


def load_workload(
    args: argparse.Namespace,
    eval_tokens: int,
    calibration_samples: int = 8,
    calibration_seq_len: int = 256,
    crows_sample: int | None = None,
    eval_seq_len: int = 512,
) -> Workload:
    """Load the model, ``eval_tokens`` tokens of WikiText-2 test, ``calibration_samples`` x
    ``calibration_seq_len`` tokens of WikiText-2 valid (batches of 4) and the CrowS-Pairs pairs
    (``crows_sample`` of them scored; None = all)."""
    model, tokenizer = load_model_and_tokenizer(args.model_path)
    wikitext = args.data / "wikitext-2"
    eval_seq_len = min(eval_seq_len, eval_tokens)
    test_ids = tokenize_for_lm(
        tokenizer,
        load_texts(str(wikitext / "test.txt")),
        seq_len=eval_seq_len,
        num_sequences=max(1, eval_tokens // eval_seq_len),
    )
    calibration = as_batches(
        calibration_dataloader(
            tokenizer,
            load_texts(str(wikitext / "valid.txt")),
            num_samples=calibration_samples,
            seq_len=calibration_seq_len,
            batch_size=4,
        )
    )
    crows_csv = args.data / "crows-pairs" / "crows_pairs_anonymized.csv"
    pairs = load_crows_pairs(crows_csv) if crows_csv.is_file() else []
    return Workload(
        model=model,
        tokenizer=tokenizer,
        test_ids=test_ids,
        calibration=calibration,
        crows_pairs=pairs,
        crows_sample=crows_sample,
        eval_seq_len=eval_seq_len,
        seed=args.seed,
    )


def measure(model: torch.nn.Module, work: Workload, crows: bool = True) -> dict[str, float]:
    """Parameters, WikiText-2 test perplexity and (if ``crows``) the CrowS-Pairs score with its 95% CI."""
    result: dict[str, float] = {
        "parameters": count_parameters(model),
        "perplexity": perplexity(model, input_ids=work.test_ids, seq_len=work.eval_seq_len),
    }
    if crows and work.crows_pairs:
        sample = (
            work.crows_sample if work.crows_sample and work.crows_sample < len(work.crows_pairs) else None
        )
        score = behavioural_bias_score(
            model, work.tokenizer, work.crows_pairs, sample_size=sample, seed=work.seed
        )
        result.update(crows=score["score"], crows_low=score["ci_low"], crows_high=score["ci_high"])
    return result


def healing_arguments(
    output_dir: str,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    logging_steps: int = 1,
) -> TrainingArguments:
    """``TrainingArguments`` for a benchmark's healing run: no checkpoints, no reporting, CPU unless CUDA."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )


def gap_closed(base: float, pruned: float, healed: float) -> float:
    """Fraction of the perplexity gap closed by healing: (pruned - healed) / (pruned - base).

    Example:
        >>> gap_closed(base=30.0, pruned=50.0, healed=34.0)
        0.8
    """
    return (pruned - healed) / (pruned - base) if pruned != base else float("nan")


def crows_cell(metrics: dict[str, float]) -> str:
    """``55.6 [53.1, 58.4]`` or ``-`` when CrowS-Pairs was not scored."""
    if "crows" not in metrics:
        return "-"
    return f"{metrics['crows']:.1f} [{metrics['crows_low']:.1f}, {metrics['crows_high']:.1f}]"


def machine_line() -> str:
    """Date, CPU, cores, torch threads, load and versions: printed above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} torch threads), transformers {transformers.__version__}, "
        f"load average {load:.1f} at the start"
    )


def command_line() -> str:
    """The command that is running, as typed from the repository root (the report's reproduction line)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return "python " + shlex.join([str(shown), *sys.argv[1:]])


class Report:
    """Markdown sections printed as they come and written to ``<out>/<name>.md`` at the end.

    With ``section=True`` the report is one ``## `` section of that file: it replaces the section of the
    same title and keeps the others (two scripts share one report this way).

    Example:
        >>> report = Report("demo", "Demo", out=Path("/tmp/bench-demo"))
        >>> report.table(["a", "b"], [[1, 2]])
        >>> path = report.write()
    """

    def __init__(self, name: str, title: str, out: Path, section: bool = False):
        self.name, self.out, self.section = name, Path(out), section
        self.start = time.perf_counter()
        self.lines = [
            f"## {title}",
            "",
            f"Measured {machine_line()}.",
            "",
            f"Command: `{command_line()}`",
            "",
        ]
        print("\n".join(self.lines), flush=True)

    def text(self, text: str) -> None:
        self.lines += [text, ""]
        print(text + "\n", flush=True)

    def table(
        self, header: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None
    ) -> None:
        block = [f"### {title}", ""] if title else []
        block += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        block += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        self.lines += block + [""]
        print("\n".join(block) + "\n", flush=True)

    def figure(self, fig, stem: str, caption: str) -> Path:
        """Save a matplotlib figure as ``<out>/<name>-<stem>.png`` and reference it in the markdown."""
        import matplotlib.pyplot as plt

        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{self.name}-{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.lines += [f"![{caption}]({path.name})", ""]
        return path

    def write(self) -> Path:
        self.lines.append(f"Wall time of the whole script: {time.perf_counter() - self.start:.0f} s.")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{self.name}.md"
        text = "\n".join(self.lines) + "\n"
        if self.section:
            text = replace_section(path.read_text() if path.is_file() else "", text)
        path.write_text(text)
        print(f"\nWritten to {path}", flush=True)
        return path


def replace_section(document: str, text: str) -> str:
    """``document`` with the ``## `` section that ``text`` starts with (its heading line) replaced by
    ``text``; appended when the document has no such section. A section runs to the next ``## `` line.

    Example:
        >>> doc = replace_section("## A\\n\\nold\\n\\n## B\\n\\nb\\n", "## A\\n\\nnew\\n")
        >>> doc.splitlines()
        ['## A', '', 'new', '', '## B', '', 'b']
    """
    heading, lines = text.splitlines()[0], document.rstrip().splitlines()
    if heading not in lines:
        return (document.rstrip() + "\n\n" if document.strip() else "") + text
    i = lines.index(heading)
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return (
        "\n".join(lines[:i] + text.rstrip().splitlines() + ([""] if j < len(lines) else []) + lines[j:])
        + "\n"
    )


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS starts from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples resident memory every 5 ms; ``extra`` is the peak above the level at entry (after
    trimming the heap: memory freed earlier would otherwise be reused unseen)."""

    def __enter__(self):
        gc.collect()
        _trim_heap()
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.start


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def fmt_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


class Progress:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {message}", flush=True)
