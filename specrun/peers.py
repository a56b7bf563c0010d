"""llama-cpp-python, the peer `specrun bench` compares against, on the same file and threads."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from specrun.engines.placement import llama_gpu
from specrun.sampling import SamplingConfig


class LlamaCppPythonPeer:
    """llama-cpp-python's high-level Llama, plain or with its prompt-lookup drafting, on the
    same file and threads: the peer users compare against."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None, gpu_layers: int | None, lookup: bool) -> None:
        from specrun.engines.llama_lib import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # Tokens drafted per step as llama-cpp-python's README recommends: 10 with a GPU,
        # 2 on a CPU alone (its default of 10 runs far slower there).
        on_gpu = llama_gpu() and gpu_layers != 0
        self.num_pred_tokens = 10 if on_gpu else 2
        with _quiet_stderr():
            # With a draft model, Llama keeps logits for every position but sizes that buffer
            # by n_batch unless logits_all is set (0.3.36), so long prompts overflow it; hence
            # logits_all, and a context no larger than the benchmark needs (n_ctx x vocab floats).
            self.llm = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=-1 if gpu_layers is None else gpu_layers, verbose=False, logits_all=lookup,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=self.num_pred_tokens) if lookup else None)

    def generate(self, prompt: list[int], max_tokens: int, sampling: SamplingConfig,
                 is_eog: Callable[[int], bool]) -> Iterator[int]:
        """Token ids as Llama.generate samples them (its speculative loop included), up to an
        end-of-generation token or `max_tokens`."""
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed)
        greedy = sampling.greedy
        n = 0
        with _quiet_stderr():
            for token in self.llm.generate(list(prompt), temp=0.0 if greedy else sampling.temperature,
                                           top_k=1 if greedy else 0, top_p=1.0 if greedy else sampling.top_p,
                                           min_p=0.0, repeat_penalty=1.0):
                if is_eog(token):
                    return
                yield token
                n += 1
                if n >= max_tokens:
                    return

    def close(self) -> None:
        with _quiet_stderr():
            self.llm.close()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama-cpp-python's Llama writes llama.cpp's logs to stderr; keep the report readable."""
    fd = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)
