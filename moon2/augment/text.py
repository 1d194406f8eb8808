"""Text engines: a list of prompts (chat messages, optional image, per-row seed) in, one string
per prompt out.

Every engine renders the same messages (:func:`build_messages`), so transformers and vLLM give
the same greedy output for the same model.
"""

from __future__ import annotations

import abc
import copy
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moon2.augment.config import OFFLINE_TEXT_MODEL, TextConfig
from moon2.augment.entities import Entity, format_entities
from moon2.errors import ConfigError


@dataclass
class TextRequest:
    """One prompt: chat ``messages`` (the user turn's content has an ``{"type": "image"}``
    part when ``image`` is given), the image itself, and the row's sampling seed."""

    messages: list[dict[str, Any]]
    image: Any = None
    seed: int = 0
    key: str = ""
    sample: bool | None = None  # None: the config's do_sample; retries sample (a new seed)


@dataclass
class TextEngine(abc.ABC):
    """Generates one title per request, in order."""

    config: TextConfig
    model_id: str = ""
    takes_images: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.config.engine}:{self.model_id}"

    @abc.abstractmethod
    def generate(self, requests: Sequence[TextRequest]) -> list[str]:
        """Raw completions (stripped) for ``requests``; an exception fails the whole call."""


def wants_sample(request: TextRequest, config: TextConfig) -> bool:
    return config.do_sample if request.sample is None else request.sample


def render_user(template: str, values: dict[str, str]) -> str:
    """Fill ``{title}``-style placeholders; unknown braces in the template stay as written."""

    class _Keep(dict):
        def __missing__(self, key: str) -> str:
            return "{" + key + "}"

    return template.format_map(_Keep(values))


def build_messages(
    config: TextConfig,
    title: str,
    entities: Sequence[Entity],
    description: str | None = None,
    category: Sequence[str] | None = None,
    with_image: bool = False,
) -> list[dict[str, Any]]:
    """The chat for one product: system turn, few-shot turns, then the row's user turn."""
    description = (description or "").strip()[: config.max_description_chars]
    values = {
        "title": title,
        "entities": format_entities(entities) or "none",
        "description": description,
        "category": " > ".join(category or []),
    }
    messages: list[dict[str, Any]] = [{"role": "system", "content": config.system_prompt}]
    for example in config.few_shot:
        shot = {
            "title": example.title,
            "entities": example.entities,
            "description": "",
            "category": "",
        }
        messages.append({"role": "user", "content": render_user(config.user_prompt, shot)})
        messages.append({"role": "assistant", "content": example.answer})
    user = render_user(config.user_prompt, values)
    if with_image:
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}
        )
    else:
        messages.append({"role": "user", "content": user})
    return messages


def clean_completion(text: str) -> str:
    """The first line of a completion, without quotes, a 'Title:' prefix or end tokens."""
    text = text.replace("<|im_end|>", "\n").replace("</s>", "\n").strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    for prefix in ("rewritten title:", "title:", "answer:"):
        if line.lower().startswith(prefix):
            line = line[len(prefix) :].strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'“”":
        line = line[1:-1].strip()
    return line.strip('"“” ')


def row_seed(base: int, key: str, attempt: int = 0, stage: str = "text") -> int:
    """A 31-bit seed from (config seed, row key, attempt, stage), stable across processes."""
    return random.Random(f"{base}:{stage}:{key}:{attempt}").getrandbits(31)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else as given, when this machine
    has it (ConfigError otherwise)."""
    import torch

    from moon2.models.base import check_device  # lazy: torch is only needed by the engines

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def resolve_dtype(dtype: str, device: str, gpu_default: str = "bfloat16") -> Any:
    import torch

    if dtype == "auto":
        dtype = gpu_default if device.startswith("cuda") else "float32"
    return getattr(torch, dtype)


def resolve_model_path(model: str) -> str:
    """The offline alias becomes the cached converted SmolLM2 directory; anything else (hub
    id or local path) is passed through to ``from_pretrained``."""
    if model == OFFLINE_TEXT_MODEL:
        from moon2.models.offline import smollm2_model_dir

        return str(smollm2_model_dir())
    return model


def is_vision_language(path: str) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) is not None


MIN_SHARED_PREFIX = 16
"""Shared prompt tokens below which a prefix cache is not worth its copy."""


class PerRowSampler:
    """A logits processor that samples each row with its own generator (seeded per row), so a
    row's sampled title does not depend on which rows share its batch. It leaves only the drawn
    token finite, so greedy decoding then picks it."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        sorted_probs[(cumulative - sorted_probs) > self.top_p] = 0.0
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            weights = sorted_probs[row].cpu()
            pick = torch.multinomial(weights / weights.sum(), 1, generator=generator)
            token = order[row, pick.to(order.device)]
            out[row, token] = 0.0
        return out


def load_tokenizer(config: TextConfig) -> tuple[str, Any, Any, bool]:
    """(model path, processor or None, tokenizer, is a vision-language model) for
    ``config.model``; a model that cannot be found is a ConfigError naming it."""
    path = resolve_model_path(config.model)
    try:
        vision = is_vision_language(path)
        if vision:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(path)
            return path, processor, processor.tokenizer, True
        from transformers import AutoTokenizer

        return path, None, AutoTokenizer.from_pretrained(path), False
    except (OSError, ValueError) as exc:
        raise model_error(config, exc) from None


def model_error(config: TextConfig, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"text.model {config.model!r} could not be loaded ({str(exc).splitlines()[0]}); "
        f"give a hub id (needs the hub), a local model directory or '{OFFLINE_TEXT_MODEL}'"
    )


def render_prompts(template_owner: Any, requests: Sequence[TextRequest]) -> list[str]:
    """Each request's chat through the model's chat template, generation prompt added (the
    one rendering every engine uses)."""
    return [
        template_owner.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
        for r in requests
    ]


class GeneratedFrequencyPenalty:
    """vLLM's ``frequency_penalty`` for Hugging Face ``generate``: each token's logit loses
    ``penalty`` times the number of times the answer (not the prompt) already contains it."""

    def __init__(self, prompt_length: int, penalty: float) -> None:
        self.prompt_length = prompt_length
        self.penalty = penalty

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0 or self.penalty == 0:
            return scores
        counts = scores.new_zeros(scores.shape)
        counts.scatter_add_(1, generated, scores.new_ones(generated.shape))
        return scores - self.penalty * counts


class TransformersTextEngine(TextEngine):
    """Batched ``generate`` (left padding) on any Hugging Face causal LM or VLM."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config=config, model_id=config.model)
        import torch
        from transformers import AutoModelForCausalLM

        path, self.processor, self.tokenizer, vision = load_tokenizer(config)
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device)
        try:
            if vision:
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise model_error(config, exc) from None
        self.takes_images = vision and config.use_image
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        # transformers 5.x renamed generate's past_key_values to cache
        forward = inspect.signature(type(self.model).forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self._prefix_ids: list[int] = []
        self._prefix_cache: Any = None
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._torch = torch

    def _prompts(self, requests: Sequence[TextRequest]) -> list[str]:
        return render_prompts(
            self.processor if self.processor is not None else self.tokenizer, requests
        )

    def _encode(self, requests: Sequence[TextRequest], prompts: Sequence[str]) -> dict[str, Any]:
        if self.processor is not None:
            images = [r.image for r in requests if r.image is not None]
            self.processor.tokenizer.padding_side = "left"
            encoded = self.processor(
                text=prompts, images=images or None, padding=True, return_tensors="pt"
            )
        else:
            encoded = self.tokenizer(
                prompts, padding=True, return_tensors="pt", add_special_tokens=False
            )
        return {k: v.to(self.device) for k, v in dict(encoded).items()}

    def generate(self, requests: Sequence[TextRequest]) -> list[str]:
        outputs: dict[int, str] = {}
        size = self.config.batch_size
        for sample in (False, True):  # greedy and sampled rows go in separate generate calls
            group = [i for i, r in enumerate(requests) if wants_sample(r, self.config) == sample]
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                texts = self._generate_batch([requests[i] for i in chunk], sample)
                outputs.update(zip(chunk, texts, strict=True))
        return [outputs[i] for i in range(len(requests))]

    def _shared_prefix(self, ids: list[list[int]]) -> int:
        """Tokens at the start of every row that a cached prefix can serve (0: none)."""
        known = self._prefix_ids
        if known and all(len(x) > len(known) and x[: len(known)] == known for x in ids):
            return len(known)
        if len(ids) < 2:
            return 0
        length = 0
        shortest = min(len(x) for x in ids) - 1  # every row keeps a token of its own
        while length < shortest and all(x[length] == ids[0][length] for x in ids):
            length += 1
        return length if length >= MIN_SHARED_PREFIX else 0

    def _encode_with_prefix(self, prompts: Sequence[str]) -> tuple[dict, Any] | None:
        """Inputs whose rows are (shared prefix, pads, own suffix) and a key/value cache of the
        prefix for every row; None when there is no prefix worth caching. Position ids follow
        the attention mask, so the pads in the middle change nothing."""
        if self.processor is not None or not self.config.prefix_cache:
            return None
        torch = self._torch
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        length = self._shared_prefix(ids)
        if not length:
            return None
        prefix = ids[0][:length]
        if prefix != self._prefix_ids:
            with torch.inference_mode():
                output = self.model(
                    input_ids=torch.tensor([prefix], device=self.device), use_cache=True
                )
            # transformers 5.x names the cache ``cache``; 4.x ``past_key_values``
            fields = getattr(output, "__dataclass_fields__", {})
            cache = output.cache if "cache" in fields else output.past_key_values
            self._prefix_ids, self._prefix_cache = prefix, cache
        width = max(len(x) for x in ids) - length
        pad = self.tokenizer.pad_token_id
        rows, masks = [], []
        for x in ids:
            gap = width - (len(x) - length)
            rows.append(x[:length] + [pad] * gap + x[length:])
            masks.append([1] * length + [0] * gap + [1] * (len(x) - length))
        cache = copy.deepcopy(self._prefix_cache)
        cache.batch_repeat_interleave(len(ids))
        encoded = {
            "input_ids": torch.tensor(rows, device=self.device),
            "attention_mask": torch.tensor(masks, device=self.device),
        }
        return encoded, cache

    def _generate_batch(self, requests: Sequence[TextRequest], sample: bool) -> list[str]:
        torch = self._torch
        prompts = self._prompts(requests)
        with_prefix = self._encode_with_prefix(prompts)
        if with_prefix is None:
            encoded, cache = self._encode(requests, prompts), None
        else:
            encoded, cache = with_prefix
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": False,
            "repetition_penalty": self.config.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.stop_ids,
        }
        from transformers import LogitsProcessorList

        processors: list[Any] = []
        if self.config.frequency_penalty:
            prompt_length = encoded["input_ids"].shape[1]
            processors.append(
                GeneratedFrequencyPenalty(prompt_length, self.config.frequency_penalty)
            )
        if sample:  # last: it picks the token from the penalised logits
            processors.append(
                PerRowSampler(
                    [r.seed for r in requests], self.config.temperature, self.config.top_p
                )
            )
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if cache is not None:
            kwargs[self._cache_argument] = cache
        with torch.inference_mode():
            generated = self.model.generate(**encoded, **kwargs)
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]


def stop_token_ids(tokenizer: Any) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def load_text_engine(config: TextConfig) -> TextEngine | None:
    """The engine ``config.engine`` names (None for ``none``)."""
    if config.engine == "none":
        return None
    if config.engine == "transformers":
        return TransformersTextEngine(config)
    if config.engine == "vllm":
        from moon2.augment.vllm_engine import VllmTextEngine

        return VllmTextEngine(config)
    raise ConfigError(f"unknown text engine {config.engine!r}")
