"""Batched generation with keras-hub's own KV-cached generate step: greedy by default, or seeded top-p sampling.

Prompts are sorted by length and batched, every batch padded to a fixed batch size and to a length bucket, so the
compiled step sees few shapes. keras-hub fills each row only past its own prompt (the prompt is kept where the
padding mask says so), so rows of different lengths share a batch; each row is then cut to `max_new_tokens` after
its own prompt, so a row's answer does not depend on its batch-mates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

LENGTH_STEP = 16  # prompt + answer widths are rounded up to a multiple of this (fewer compiled shapes)
GREEDY_READY = "_gemma_pipeline_greedy"  # set on a model whose compiled generate step is greedy


@dataclass
class Generated:
    tokens: list[list[int]]  # each row's answer ids, without the stop token, at most max_new_tokens
    stopped: list[bool]  # the row produced a stop token within max_new_tokens
    seconds: float = 0.0  # wall time of the generate calls (compilation included)
    steps: int = 0  # answer tokens produced, padded rows excluded
    shapes: set[tuple[int, int]] = field(default_factory=set)

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def configure(model, temperature: float, top_p: float, seed: int) -> None:
    """Greedy at temperature 0; else top-p sampling seeded, so a rerun draws the same answers."""
    import keras_hub

    if temperature == 0:
        if getattr(model, GREEDY_READY, False):
            return  # keep the compiled step: it reads the weights at each call, so a tuned model reuses the base's
        model.compile(sampler=keras_hub.samplers.GreedySampler())
    else:  # a fresh sampler per model: each model's draws start from the seed, whoever generated before it
        model.compile(sampler=keras_hub.samplers.TopPSampler(p=top_p, temperature=temperature, seed=seed))
    model.generate_function = None  # the compiled step closes over the sampler
    setattr(model, GREEDY_READY, temperature == 0)


def generate(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...], batch_size: int,
             pad_id: int) -> Generated:
    """Answers to already-tokenized prompts (BOS included), in batches of at most `batch_size` (evened out: 97 prompts
    at 64 run as two batches of 49). Rows are returned in the prompts' order."""
    if not prompts:
        return Generated([], [])
    fn = model.make_generate_function()
    batch_size = -(-len(prompts) // -(-len(prompts) // batch_size))  # as few batches, as evenly filled, as can be
    order = np.argsort([len(p) for p in prompts], kind="stable")
    answers: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    result = Generated(answers, stopped)
    start = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        rows = order[begin: begin + batch_size]
        longest = max(len(prompts[i]) for i in rows)
        width = -(-(longest + max_new_tokens) // LENGTH_STEP) * LENGTH_STEP
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for slot, i in enumerate(rows):
            ids[slot, : len(prompts[i])] = prompts[i]
            mask[slot, : len(prompts[i])] = True
        for slot in range(len(rows), batch_size):  # a fixed batch shape: repeat the first row, ignored below
            ids[slot], mask[slot] = ids[0], mask[0]
        result.shapes.add((batch_size, width))
        out = fn({"token_ids": ids, "padding_mask": mask}, stop_token_ids=tuple(stop_ids) or None)
        tokens = np.asarray(out["token_ids"])
        for slot, i in enumerate(rows):
            answer = [int(t) for t in tokens[slot, len(prompts[i]): len(prompts[i]) + max_new_tokens]]
            cut = next((p for p, t in enumerate(answer) if t in stop_ids), None)
            answers[i] = answer if cut is None else answer[:cut]
            stopped[i] = cut is not None
            result.steps += len(answers[i]) + (1 if cut is not None else 0)
    result.seconds = time.perf_counter() - start
    return result


def prompt_ids(tokenizer, prompts: list[str], limit: int) -> list[list[int]]:
    """BOS + the prompt's tokens, as the fine-tune saw them; a prompt past `limit` keeps its last tokens (the end
    of a prompt holds the turn marker the answer follows)."""
    bos = tokenizer.start_token_id
    pieces = tokenizer(prompts) if prompts else []
    out = []
    for piece in pieces:
        ids = [bos, *(int(t) for t in piece)]
        out.append(ids if len(ids) <= limit else [bos, *ids[len(ids) - limit + 1:]])
    return out

