"""Build a tiny offline Qwen2-style model directory that vLLM can serve with dummy weights."""

from __future__ import annotations

import json
import os
import pathlib
import random
import tempfile
from typing import Any

__all__ = ["TINY_MODEL_ENGINE_ARGS", "build_tiny_model"]

#: Engine arguments (everything but ``model``) that start the tiny model quickly on a CPU.
TINY_MODEL_ENGINE_ARGS: dict[str, Any] = {
    # No weight files exist: vLLM fills the parameters with random values.
    "load_format": "dummy",
    # CUDA graphs / torch.compile cost seconds at start-up and buy nothing for a toy model.
    "enforce_eager": True,
    "max_model_len": 1024,
    # float32, not the model's bfloat16: vLLM's CPU attention takes an AMX path for
    # bfloat16 that died with SIGILL on some x86-64 CPUs (the demo's first request, on
    # one VM), and float32 runs on every one. The model is tiny: the cost is nil.
    "dtype": "float32",
    # An explicit KV-cache size skips memory profiling and keeps several engines per process
    # affordable; one token costs 2 layers * (K+V) * 1 kv head * 64 * 4 bytes = 1 KiB,
    # so 64 MiB still holds ~65k tokens.
    "kv_cache_memory_bytes": 64 * 1024 * 1024,
    "max_num_seqs": 64,
    "seed": 0,
    # Random weights pad structured (JSON) output with whitespace until max_tokens;
    # compact JSON always closes. vLLM reads this per engine, not per request.
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}

# Bumped whenever the files written below change, so stale directories get rebuilt.
_FORMAT_VERSION = 5
_MARKER = "lylm_tiny_model.json"
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen's markup for tool calls (Hermes format) and reasoning, as plain (not special) added
# tokens like Qwen's: vLLM's hermes tool parser and its think-tag reasoning parsers look
# them up in the vocabulary, so a test pool can run them.
_MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
_MIN_HEAD_DIM = 32  # vLLM's CPU attention backend rejects smaller heads.
# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text for the tokenizer; written for this module.
_CORPUS = """\
The morning train left the station a little after seven, carrying commuters, students and
a handful of travellers who watched the fields roll past the windows. Most of them read,
some of them slept, and a few talked quietly about the weather and the week ahead.

A language model reads text as a sequence of tokens. Each token is a short piece of a word,
a whole word, or a mark of punctuation. The model predicts the next token from the ones
before it, one step at a time, until it reaches a stop token or a length limit.

When many requests arrive at once, a server has to decide where to send each of them. A
simple policy picks the engine with the fewest requests in flight; a better one also looks
at how full each cache is, how long the queue has grown, and whether a prompt shares a
prefix with work that is already cached on one of the engines.

Good tests are small, fast and honest. They check one thing, they fail for one reason,
and they say clearly what went wrong. A slow test suite is a suite that nobody runs, so
it pays to keep models tiny, inputs short, and the number of moving parts low.

Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text as often as words do, and so
do questions: what time is it? where are we going? why does the sky look blue today?
"""

# ChatML; list-of-parts content is reduced to its text parts, joined by newlines as vLLM does
# when it flattens such content for templates that expect plain strings. The role list must
# spell 'developer' out: vLLM rewrites developer messages to system ones for templates that
# do not mention it, and then its rendering would differ from transformers'.
_CHAT_TEMPLATE = (
    # Declared tools, as Qwen2.5 renders them (Hermes format): a system turn listing them.
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n# Tools\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\nCall a function with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>'"
    " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    # An assistant turn's earlier calls, in the markup the hermes parser reads back.
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{- '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson) + '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _filler_text(seed: int, words: int) -> str:
    """Return deterministic pseudo-words that give BPE more pairs to merge."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "ber", "nal", "sto", "fe", "dru"]
    return " ".join(
        "".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(words)
    )


def _train_tokenizer(vocab_size: int, seed: int) -> Any:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries."""
    # Imported lazily so that importing lylm.testing stays cheap.
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    filler_words = 0
    while True:
        tokenizer = Tokenizer(models.BPE())
        # transformers 5 loads this directory as a Qwen2Tokenizer (config model_type "qwen2"),
        # which replaces normalizer and pre-tokenizer with Qwen2's; use the same ones here so
        # tokenizer.json, transformers and vLLM all produce the same ids.
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(_MARKUP_TOKENS),
            # Listed first so that they get ids 0, 1, 2 whatever the vocabulary size.
            special_tokens=list(_SPECIAL_TOKENS),
            # All 256 byte symbols, so that any text can be encoded.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        corpus = [_CORPUS]
        if filler_words:
            corpus.append(_filler_text(seed, filler_words))
        tokenizer.train_from_iterator(corpus, trainer=trainer)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size >= vocab_size - len(_MARKUP_TOKENS):
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _MARKUP_TOKENS])
            return tokenizer
        # The text ran out of pairs to merge before the vocabulary was full: add more text.
        filler_words = max(256, filler_words * 2)
        if filler_words > 1 << 20:
            raise RuntimeError(f"could not train a tokenizer with {vocab_size} tokens")


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def build_tiny_model(
    directory: str | os.PathLike[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> pathlib.Path:
    """Write (or reuse) a tiny Qwen2 model directory for ``load_format="dummy"``; return its path."""
    ints = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
    }
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim < _MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden_size} / {num_heads} = {head_dim}, "
            f"but vLLM's CPU attention needs head_dim >= {_MIN_HEAD_DIM}; "
            "raise hidden_size or lower num_heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    # 256 byte symbols + the special tokens are the least a byte-level BPE can have.
    min_vocab = 256 + len(_SPECIAL_TOKENS) + len(_MARKUP_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab}, got {vocab_size}")

    path = pathlib.Path(directory)
    marker_path = path / _MARKER
    params: dict[str, Any] = {"format_version": _FORMAT_VERSION, "seed": seed, **ints}
    files = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
    try:
        if json.loads(marker_path.read_text(encoding="utf-8")) == params and all(
            (path / name).is_file() for name in files
        ):
            return path
    except (OSError, ValueError):
        pass  # Missing or unreadable marker: build from scratch.

    path.mkdir(parents=True, exist_ok=True)
    # Drop the marker first so that a crash below leaves a directory that is visibly incomplete.
    marker_path.unlink(missing_ok=True)

    # The seed only drives the filler text, so it matters only for vocabularies the corpus
    # cannot fill on its own (above ~600 tokens); it is recorded in the marker regardless.
    tokenizer = _train_tokenizer(vocab_size, seed)
    eot_id, _, im_end_id = (tokenizer.token_to_id(t) for t in _SPECIAL_TOKENS)

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        # Like Qwen2 instruct models: no BOS is prepended; a turn ends with <|im_end|>.
        "bos_token_id": eot_id,
        "eos_token_id": im_end_id,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_position_embeddings,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": eot_id,
        "eos_token_id": [im_end_id, eot_id],
        "pad_token_id": eot_id,
    }

    _write_atomic(path / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_atomic(path / "tokenizer_config.json", _dump(tokenizer_config))
    _write_atomic(path / "generation_config.json", _dump(generation_config))
    _write_atomic(path / "config.json", _dump(config))
    _write_atomic(marker_path, _dump(params))
    return path
