"""lm-evaluation-harness's `local-completions` model against the server, on a multiple-choice task from a local JSON
file: the same per-choice loglikelihoods and accuracy as scoring the same token ids with decoderkit's model directly.

lm-eval (`lm-eval[api]==0.4.13`) is in the test extra, so CI runs this module; an environment installed without
the test extra skips it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

import test_serve  # noqa: E402
from test_serve import API_KEY, MODEL_NAME, RunningServer  # noqa: E402

from decoderkit.serve.app import ServerSettings  # noqa: E402
from decoderkit.serve.engine import Engine  # noqa: E402

model_dir, model, tokenizer = test_serve.model_dir, test_serve.model, test_serve.tokenizer  # the same fixtures

QUESTIONS = [
    ("To be, or not to", ["be", "question", "fortune", "sea"], 0),
    ("The slings and", ["arrows", "troubles", "mind", "be"], 0),
    ("Whether tis nobler in the", ["mind", "sea", "slings", "not"], 0),
    ("Or to take arms against a sea of", ["troubles", "arrows", "fortune", "question"], 0),
    ("that is the", ["question", "mind", "sea", "slings"], 0),
    ("The slings and arrows of outrageous", ["fortune", "troubles", "be", "mind"], 0),
]


@torch.no_grad()
def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by decoderkit's model, split into tokens as lm-eval splits a pair."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


@pytest.mark.slow
def test_lm_eval_multiple_choice_through_the_server(model, tokenizer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.json"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "dk_mc.yaml").write_text(
        "task: dk_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token

    engine = Engine(model, tokenizer, block_size=8, max_prefill_tokens=16)
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=60)
    with RunningServer(engine, settings) as server:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": MODEL_NAME, "base_url": f"{server.base}/v1/completions", "max_length": 256,
                        "num_concurrent": 1, "max_retries": 1, "batch_size": 4},
            tasks=["dk_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        )
    samples = out["samples"]["dk_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        question, choices, answer = QUESTIONS[sample["doc_id"]]
        served = [resp[0][0] for resp in sample["resps"]]
        assert [tuple(arg) for arg in sample["arguments"]] == [(question, " " + c) for c in choices]
        direct = [direct_loglikelihood(model, tokenizer, context, continuation)
                  for context, continuation in sample["arguments"]]
        assert served == pytest.approx(direct, abs=1e-4), (question, served, direct)
        correct += int(max(range(len(choices)), key=direct.__getitem__) == answer)
    assert out["results"]["dk_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
