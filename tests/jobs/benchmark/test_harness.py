"""lm-evaluation-harness on a keras-hub model (jobs.benchmark.harness), on a tiny random Gemma 3.

Two references. Direct: the same Keras model's full-sequence logits (and `jobs.common.lm.token_nll`), within 1e-4
absolute per request: only batching, padding and the head run on scored positions differ. Independent: the model
exported to Hugging Face format (the convert stage's own `export`) and run through lm-eval's own HFLM backend
(torch, float32), on the same requests and the same two tasks, within 1e-3 absolute per request log-likelihood
(two frameworks' float32 kernels) and with equal accuracies, exact match and generated text. The exported Gemma
tokenizer adds BOS itself (HFLM leaves `add_bos_token` unset, so the tokenizer's default applies); keras-hub's does
not, and the backend adds it: both score BOS + context + continuation, which `test_tokenization_agrees` checks. For
rolling log-likelihoods HFLM's tokenizer-added BOS becomes a scored token after the BOS prefix (lm-eval issue #3333);
the backend scores the text given BOS, so that comparison runs HFLM with `add_bos_token=False`, where it does too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.benchmark import harness
from jobs.contract.errors import EXIT_BAD_INPUT, BadInputError

DATA = Path(__file__).resolve().parents[2] / "data" / "lm_eval"
TASKS = (str(DATA / "stdlib_mc.yaml"), str(DATA / "stdlib_gen.yaml"))
MAX_LENGTH = 64
BATCH = 4
DIRECT_TOLERANCE = 1e-4
HF_TOLERANCE = 1e-3
LONG = "Machine learning models learn patterns from data. " * 12  # past MAX_LENGTH tokens: truncated, several windows
PAIRS = [
    ("Question: What does os.path.join do?\nAnswer:", " Join one or more path segments intelligently."),
    ("", "The quick brown fox jumps over the lazy dog."),  # no context: BOS alone conditions
    ("Return the absolute value ", "of a number."),  # the trailing space moves to the continuation
    (LONG, " Fine-tuning adapts a pretrained model to a new task."),  # kept from the left
    ("Open a file and", " return a stream."),
]
GEN_KWARGS = {"until": ["\n", "<end_of_turn>"], "max_gen_toks": 12, "do_sample": False}
PROMPTS = ["Question: Which built-in opens a file?\nAnswer:", "Sort the list", "The quick brown fox",
           "Question: what is the capital of France? Answer:", "Convert a number"]


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def keras_model(tiny_gemma3):
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(tiny_gemma3))


@pytest.fixture(scope="module")
def lm(keras_model):
    return harness.KerasHubLM(keras_model, batch_size=BATCH, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hflm(keras_model, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    from jobs.convert.core import export

    directory = tmp_path_factory.mktemp("hf")
    export(keras_model, directory)
    return HFLM(pretrained=str(directory), device="cpu", dtype="float32", batch_size=BATCH, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(keras_model, tmp_path_factory):
    return harness.run_tasks(keras_model, TASKS, tmp_path_factory.mktemp("ours"), batch_size=BATCH,
                             max_length=MAX_LENGTH, seed=0)


@pytest.fixture(scope="module")
def reference(keras_model):
    """(log-likelihood by the model's full logits, the same by `token_nll`, greedy) of a continuation, from one
    sequence right-padded to MAX_LENGTH: one compiled shape, and causal attention keeps padding out of view."""
    import jax

    from jobs.common.lm import token_nll

    state = [v.value for v in keras_model.trainable_variables], [v.value for v in keras_model.non_trainable_variables]
    logits_fn = jax.jit(lambda t, n, x: keras_model.stateless_call(t, n, x)[0])
    nll_fn = jax.jit(lambda t, n, x, y: token_nll(keras_model, t, n, x, y)[0])

    def score(context: list[int], continuation: list[int]) -> tuple[float, float, bool]:
        full = (context + continuation)[-(MAX_LENGTH + 1):]
        n, length = min(len(continuation), len(full) - 1), len(full) - 1
        ids, y = np.zeros((1, MAX_LENGTH), np.int32), np.zeros((1, MAX_LENGTH), np.int32)
        ids[0, :length], y[0, :length] = full[:-1], full[1:]
        x = {"token_ids": ids, "padding_mask": np.arange(MAX_LENGTH)[None] < length}
        logits = np.asarray(logits_fn(*state, x), np.float64)[0, length - n: length]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        targets = y[0, length - n: length]
        by_nll = -float(np.asarray(nll_fn(*state, x, y))[0, length - n: length].sum())
        return float(log_probs[np.arange(n), targets].sum()), by_nll, bool((log_probs.argmax(-1) == targets).all())

    return score


def test_run_tasks_reports_each_metric_under_the_plans_names(ours):
    from gemma_pipeline.plan import eval_tasks

    predicted = eval_tasks.metrics_of(TASKS, lambda uri: Path(uri).read_bytes())
    assert {task: tuple(metrics) for task, metrics in ours.items()} == predicted
    for metrics in ours.values():
        for result in metrics.values():
            assert 0.0 <= result["value"] <= 1.0
            assert result["stderr"] is None or 0.0 <= result["stderr"] <= 0.5


def test_loglikelihood_matches_the_models_own_logits(lm, reference):
    scored = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(lm.encode_pairs(PAIRS), scored):
        by_logits, by_nll, expected_greedy = reference(context, continuation)
        assert logprob == pytest.approx(by_logits, abs=DIRECT_TOLERANCE)
        assert logprob == pytest.approx(by_nll, abs=DIRECT_TOLERANCE)
        assert greedy == expected_greedy
    assert len(sum(lm.encode_pairs([PAIRS[3]])[0], [])) > MAX_LENGTH + 1  # the long pair is truncated
    assert lm.encode_pairs([PAIRS[1]])[0][0] == [lm.tokenizer.start_token_id]


def test_the_models_own_greedy_continuation_is_marked_greedy(lm, reference):
    [(prompt, _)] = lm.encode_pairs([("Question: What does os.path.join do?\nAnswer:", " x")])
    vocabulary = lm.tokenizer.vocabulary_size()
    greedy = []
    for _ in range(3):  # the model's own greedy tokens, one by one: each is greedy only if it is the argmax
        greedy.append(next(t for t in range(vocabulary) if reference(prompt, [*greedy, t])[2]))
    other = [*greedy[:-1], (greedy[-1] + 1) % vocabulary]
    assert [g for _, g in lm.score_tokens([(prompt, greedy), (prompt, other), (prompt, greedy[:1])])] == [True, False, True]


def test_rolling_loglikelihood_is_the_sum_of_token_log_probs(lm, reference):
    text = "The quick brown fox jumps over the lazy dog. Sort the list in place."
    [total] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    tokens = [int(t) for t in lm.tokenizer(text)]
    assert len(tokens) < MAX_LENGTH
    _, by_nll, _ = reference([lm.tokenizer.start_token_id], tokens)
    assert total == pytest.approx(by_nll, abs=DIRECT_TOLERANCE)


def test_greedy_generation_is_keras_hubs_own(lm, keras_model):
    """keras-hub's own generate, batched at the longest prompt's length: that prompt's answer has the same token
    budget (equal answers); the others' have more, so ours must begin theirs."""
    answers = lm.generate_until(requests("generate_until", [(p, dict(GEN_KWARGS)) for p in PROMPTS]))
    lengths = [1 + len(lm.tokenizer(p)) for p in PROMPTS]
    keras_model.compile(sampler="greedy")
    keras_model.generate_function = None
    stops = [lm.tokenizer.end_token_id, lm.tokenizer.token_to_id("<end_of_turn>")]
    texts = keras_model.generate(PROMPTS, max_length=max(lengths) + GEN_KWARGS["max_gen_toks"], stop_token_ids=stops)
    for prompt, length, answer, text in zip(PROMPTS, lengths, answers, texts):
        assert text.startswith(prompt)
        expected = text[len(prompt):]
        for stop in GEN_KWARGS["until"]:
            expected = expected.split(stop)[0]
        assert expected == answer if length == max(lengths) else expected.startswith(answer), (prompt, answer, expected)
    assert any(answers), "every answer is empty: the comparison shows nothing"


def test_the_backend_loads_from_model_args_as_registered(tiny_gemma3, lm):
    from lm_eval.api.registry import get_model

    loaded = get_model("keras-hub").create_from_arg_string(f"pretrained={tiny_gemma3},max_length={MAX_LENGTH}",
                                                            {"batch_size": BATCH, "device": "cpu"})
    assert isinstance(loaded, harness.KerasHubLM) and (loaded.batch_size, loaded.max_length) == (BATCH, MAX_LENGTH)
    [(loaded_logprob, loaded_greedy)], [(logprob, greedy)] = loaded.score_pairs(PAIRS[:1]), lm.score_pairs(PAIRS[:1])
    assert loaded_logprob == pytest.approx(logprob, abs=DIRECT_TOLERANCE) and loaded_greedy == greedy
    with pytest.raises(BadInputError, match="pretrained"):
        harness.KerasHubLM(pretrained=None)


def test_tokenization_agrees(lm, hflm):
    for context, continuation in PAIRS[:1] + PAIRS[2:]:
        assert lm.encode_pairs([(context, continuation)])[0] == tuple(
            map(list, hflm._encode_pair(context, continuation))), context


def test_loglikelihoods_agree_with_lm_evals_hugging_face_backend(lm, hflm):
    ours = lm.loglikelihood(requests("loglikelihood", PAIRS))
    theirs = hflm.loglikelihood(requests("loglikelihood", PAIRS))
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=HF_TOLERANCE)
        assert greedy_a == greedy_b
    texts = [("The quick brown fox jumps over the lazy dog.",), (LONG,)]  # one window, and several
    ours = lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    hflm.add_bos_token = False  # BOS as the prefix only, not also scored (module docstring)
    try:
        theirs = hflm.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    finally:
        hflm.add_bos_token = None
    assert ours == pytest.approx(theirs, abs=HF_TOLERANCE)


def test_generation_agrees_with_lm_evals_hugging_face_backend(lm, hflm):
    """Compared as tokens: the random model answers in byte-fallback pieces that are not UTF-8, which
    SentencePiece (keras-hub) and the tokenizers library (transformers) decode to different replacement text; so
    HFLM's answers are compared with ours decoded by the same Hugging Face tokenizer and cut the same way."""
    from lm_eval.models.utils import postprocess_generated_text

    args = [(p, dict(GEN_KWARGS)) for p in PROMPTS]
    ours = [postprocess_generated_text(hflm.tok_decode(ids), GEN_KWARGS["until"], None)
            for ids in lm.generate_tokens(PROMPTS, GEN_KWARGS)]
    assert ours == hflm.generate_until(requests("generate_until", args))
    assert any(ours), "every answer is empty: the comparison shows nothing"


def test_task_metrics_agree_with_lm_evals_hugging_face_backend(ours, hflm, tmp_path):
    import lm_eval

    specs, manager = harness.resolve_tasks(TASKS, tmp_path)
    theirs = harness.summarize(lm_eval.simple_evaluate(
        model=hflm, tasks=specs, task_manager=manager, bootstrap_iters=harness.BOOTSTRAP_ITERS, log_samples=False,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)["results"])
    values = {task: {m: r["value"] for m, r in metrics.items()} for task, metrics in ours.items()}
    assert values == {task: {m: r["value"] for m, r in metrics.items()} for task, metrics in theirs.items()}


def test_task_files_resolve_their_data_files_beside_the_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for the relative data file here
    specs, _ = harness.resolve_tasks(TASKS[:1], tmp_path / "work")
    assert specs[0]["dataset_kwargs"]["data_files"] == {"test": str(DATA / "stdlib_mc.jsonl")}


def test_gs_tasks_stage_with_data(gcs, tmp_path):
    """A gs:// task file and the data file it names relative to itself are both staged in."""
    from jobs.common import storage

    for name in ("stdlib_gen.yaml", "stdlib_gen.jsonl"):
        storage.write_bytes(f"{gcs}/tasks/{name}", (DATA / name).read_bytes())
    specs, _ = harness.resolve_tasks((f"{gcs}/tasks/stdlib_gen.yaml",), tmp_path)
    staged = Path(specs[0]["dataset_kwargs"]["data_files"]["test"])
    assert staged.is_absolute() and staged.is_relative_to(tmp_path)
    assert staged.read_bytes() == (DATA / "stdlib_gen.jsonl").read_bytes()


@pytest.mark.parametrize(("text", "expected"), [
    ("task: t\nmetric_list: [unclosed\n", "an lm-evaluation-harness task YAML"),
    ("output_type: multiple_choice\n", "a task YAML with a `task` name"),
    ("group: g\ntask: [hellaswag]\n", "a task YAML with a `task` name"),
])
def test_bad_task_files_are_bad_input(tmp_path, text, expected):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError) as err:
        harness.resolve_tasks((str(path),), tmp_path / "work")
    assert err.value.exit_code == EXIT_BAD_INPUT and err.value.field == "--eval-tasks" and err.value.value == str(path)
    assert expected in str(err.value)
    with pytest.raises(BadInputError, match="an existing task YAML"):
        harness.resolve_tasks((str(tmp_path / "absent.yaml"),), tmp_path / "work")


def test_an_unknown_task_name_is_bad_input_with_close_matches(tmp_path, monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    # lm-eval's own tasks take seconds to index; the two test tasks stand in for them.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_defaults: real(include_path=str(DATA),
                                                                                      include_defaults=False))
    harness.resolve_tasks(("stdlib_mc",), tmp_path)
    with pytest.raises(BadInputError) as err:
        harness.resolve_tasks(("stdlib_mx",), tmp_path)
    assert err.value.exit_code == EXIT_BAD_INPUT and err.value.value == "stdlib_mx"
    assert "task, group or tag name" in str(err.value) and "did you mean stdlib_mc" in str(err.value)
