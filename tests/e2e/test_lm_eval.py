"""lm-evaluation-harness (``lm_eval``) runs a loglikelihood task (multiple choice: scored from
prompt logprobs, ``echo`` + ``logprobs``) and a generate_until task against ``/v1/completions``
of the shared server, end to end, with no hub access: the tasks are YAML files over a local
JSON data file this test writes, the tokenizer is the demo checkpoint's. Scores are noise on
random weights; the run must complete with every document scored."""

import json
import math

import pytest

from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

DOCS = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": 0,
         "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]

CHOICE_TASK = """task: tkv_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

GENERATE_TASK = """task: tkv_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_loglikelihood_and_generate_until_complete(e2e_server, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tkv_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tasks / "tkv_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    model_args = {"model": "tritonkv-demo", "base_url": f"{e2e_server.openai_url}/completions",
                  "tokenizer": ensure_demo_checkpoint(), "tokenizer_backend": "huggingface",
                  "num_concurrent": 1, "max_retries": 1, "max_length": 512}
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args,
                                      tasks=["tkv_choice", "tkv_generate"], task_manager=TaskManager(
                                          include_path=str(tasks)), limit=len(DOCS), batch_size=1,
                                      log_samples=True)
    choice, generate = results["results"]["tkv_choice"], results["results"]["tkv_generate"]
    assert 0.0 <= choice["acc,none"] <= 1.0 and 0.0 <= generate["exact_match,none"] <= 1.0
    assert len(results["samples"]["tkv_choice"]) == len(DOCS) == len(results["samples"]["tkv_generate"])
    for sample in results["samples"]["tkv_choice"]:  # every choice scored: a finite log-likelihood
        scores = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]
        assert len(scores) == 3 and all(math.isfinite(s) and s < 0 for s in scores)
    for sample in results["samples"]["tkv_generate"]:
        assert isinstance(sample["resps"][0][0], str)
