"""The files of Hugging Face transformers models, shared by the sequence-classifier and the
causal-LM sources: ``save_pretrained`` folders, configs, weights and tokenizers, each read with
errors in one line, and the checks that experts and base agree (architecture, vocabulary).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.errors import CheckpointError, IncompatibleExpertError
from adamerge.task_types import TaskType

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
PEFT_PREFIX = "peft:"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# config fields that fix tensor shapes (compared when both configs have them)
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "embedding_size",
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "d_model",
)


# ----------------------------------------------------------------------------- references, files


def hf_dir(reference: str, what: str) -> Path:
    """The folder of ``hf:DIR`` (or a bare ``DIR``), checked for a config and weights.

    Raises:
        CheckpointError: no such folder, no ``config.json``, or no weights file.
    """
    path = Path(reference[len(HF_PREFIX) :] if reference.startswith(HF_PREFIX) else reference)
    if not path.is_dir():
        hint = " (a save_pretrained folder)" if path.is_file() else ""
        raise CheckpointError(f"{what} {reference!r}: folder {path} does not exist{hint}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} {path}: no config.json (save the model with model.save_pretrained(DIR))")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{what} {path}: no weights ({' / '.join(WEIGHT_FILES)}); save the model with model.save_pretrained(DIR)")
    return path


def peft_dir(reference: str, task: str) -> Path:
    """The folder of ``peft:DIR``, checked for a peft adapter config."""
    path = Path(reference[len(PEFT_PREFIX) :]).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"expert {task!r}: {path} is not a peft adapter folder (no adapter_config.json)")
    return path


def source_references(base_path: Path, dense: Mapping[str, Path], adapters: Mapping[str, Path], head_pattern: str | None) -> dict[str, Any]:
    """What a run records of its Hugging Face sources: ``hf:`` / ``peft:`` references with absolute paths."""
    return {
        "base": f"{HF_PREFIX}{base_path.resolve()}",
        "experts": {t: f"{PEFT_PREFIX}{p.resolve()}" for t, p in adapters.items()}
        | {t: f"{HF_PREFIX}{p.resolve()}" for t, p in dense.items()},
        "head_pattern": head_pattern,
    }


@contextlib.contextmanager
def without_weight_init() -> Iterator[None]:
    """Build transformers models without drawing their random initial weights.

    Only for a model whose every state-dict tensor is loaded right after (``strict=True``): the
    draws would otherwise be paid once per exported task, for nothing.
    transformers 5 keeps the switch in ``transformers.initialization``, 4.x in ``modeling_utils``.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (adamerge reports problems itself)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def read_config(path: Path, what: str) -> Any:
    """``AutoConfig`` of a folder, refusing unreadable configs in one line."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as error:  # JSON errors, unknown model_type, ...
        raise CheckpointError(f"{what} {path}: cannot read config.json: {_first_line(error)}") from None


def load_pretrained(auto_class: Any, path: Path, what: str) -> tuple[nn.Module, set[str]]:
    """``auto_class.from_pretrained(path)`` in float32 and eval mode, refusing mismatched shapes.

    Returns:
        The model and the names of tensors its checkpoint lacked (newly initialised).

    Raises:
        CheckpointError: unreadable or corrupt weights; a tensor of another shape than the config says.
    """
    try:
        with quiet_transformers():
            model, info = auto_class.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
            )
    except Exception as error:  # safetensors header errors, truncated pickles, unknown classes, ...
        raise CheckpointError(f"{what} {path}: cannot load the weights: {_first_line(error)}") from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        name, stored, expected = mismatched[0]
        raise CheckpointError(f"{what} {path}: tensor {name!r} has shape {tuple(stored)}, its config.json implies {tuple(expected)}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.debug("%s %s: ignored %d stored tensor(s), e.g. %s", what, path, len(unexpected), unexpected[:3])
    return model.eval(), set(info.get("missing_keys") or [])


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path, what: str) -> Any:
    """``AutoTokenizer`` of a folder, refusing a folder without one in one line."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise CheckpointError(
            f"{what} {path}: no tokenizer ({' / '.join(TOKENIZER_FILES[:3])}); save it with tokenizer.save_pretrained(DIR)"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise CheckpointError(f"{what} {path}: cannot load the tokenizer: {_first_line(error)}") from None


# ----------------------------------------------------------------------------- compatibility


def check_architecture(config: Any, base_config: Any, task: str, path: Path) -> None:
    """Refuse an expert of another model type or size than the base (names the field)."""
    if config.model_type != base_config.model_type:
        raise IncompatibleExpertError(f"expert {task!r} ({path}) is a {config.model_type!r} model, the base is {base_config.model_type!r}")
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(config, name, None), getattr(base_config, name, None)
        if mine is not None and theirs is not None and mine != theirs:
            raise IncompatibleExpertError(f"expert {task!r} ({path}) has {name}={mine}, the base has {name}={theirs}: another architecture")


def check_vocabulary(tokenizer: Any, base_tokenizer: Any, task: str, path: Path) -> None:
    """Refuse an expert whose tokenizer maps tokens to other ids than the base's."""
    mine, theirs = tokenizer.get_vocab(), base_tokenizer.get_vocab()
    if mine == theirs:
        return
    only_mine = sorted(set(mine) - set(theirs))
    only_base = sorted(set(theirs) - set(mine))
    moved = sorted(t for t in set(mine) & set(theirs) if mine[t] != theirs[t])
    parts = [f"{len(mine)} tokens vs the base's {len(theirs)}"]
    if only_mine:
        parts.append(f"{len(only_mine)} not in the base's (e.g. {only_mine[:3]})")
    if only_base:
        parts.append(f"{len(only_base)} of the base's missing (e.g. {only_base[:3]})")
    if moved:
        parts.append(f"{len(moved)} with another id (e.g. {moved[0]!r}: {mine[moved[0]]} vs {theirs[moved[0]]})")
    raise IncompatibleExpertError(f"expert {task!r} ({path}): its tokenizer's vocabulary differs from the base's: {'; '.join(parts)}")


def read_expert_configs(paths: Mapping[str, Path], base_config: Any, tokenizer: Any) -> dict[str, Any]:
    """Each expert folder's config, refusing another architecture or tokenizer vocabulary than the base's."""
    configs = {}
    for task, path in paths.items():
        configs[task] = read_config(path, f"expert {task!r}")
        if has_tokenizer(path):  # first: added tokens are named, not just a vocab_size that differs
            check_vocabulary(load_tokenizer(path, f"expert {task!r}"), tokenizer, task, path)
        else:
            logger.info("expert %s (%s) has no tokenizer of its own: using the base's", task, path)
        check_architecture(configs[task], base_config, task, path)
    return configs


def is_causal_lm(config: Any) -> bool:
    """Whether a config's recorded architecture is a causal language model (``LlamaForCausalLM``,
    ``GPT2LMHeadModel``, ...)."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in getattr(config, "architectures", None) or [])


def task_auto_class(task_type: TaskType) -> Any:
    """The transformers auto-class the task type names (``AutoModelForSequenceClassification`` for
    classification, ``AutoModelForCausalLM`` for next-token prediction, ...)."""
    import transformers

    return getattr(transformers, task_type.auto_class)
