"""Prompt logprobs end to end on the shared server (fp32 CPU): OpenAI completions with
``echo`` + ``logprobs`` (as the openai SDK parses them), the vLLM ``sampling_parameters`` key
``prompt_logprobs`` (gRPC, Triton's vLLM-backend form) and the client library all equal
log_softmax of HF transformers' logits at each prompt position within 1e-4."""

import json

import pytest

from test_vllm_compat import grpc_responses, vllm_inputs, PROMPT
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.model.tokenizer import TextTokenizer

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_prompt(e2e_server):
    """(prompt ids, HF log_softmax rows) of the demo checkpoint for ``PROMPT``."""
    import torch
    import transformers

    ckpt = ensure_demo_checkpoint()
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = TextTokenizer(ckpt).encode(PROMPT, add_special_tokens=True)
    with torch.no_grad():
        rows = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    return ids, rows


def test_openai_echo_logprobs_equal_hf(e2e_server, hf_prompt):
    import openai

    ids, rows = hf_prompt
    client = openai.OpenAI(base_url=e2e_server.openai_url, api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="tritonkv-demo", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2,
                                  echo=True)
    lp = r.choices[0].logprobs
    n = len(ids)
    assert r.choices[0].text.startswith(PROMPT) and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(rows[q - 1, ids[q]]) for q in range(1, n)]
    assert max(abs(a - w) for a, w in zip(lp.token_logprobs[1:n], want)) < TOL
    for q in range(1, n):  # the top 2 at each position are HF's two best (as text)
        assert len(lp.top_logprobs[q]) <= 3 and max(lp.top_logprobs[q].values()) == pytest.approx(
            float(rows[q - 1].max()), abs=TOL)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the generated token comes last, scored at the prompt's last position
    assert abs(lp.token_logprobs[n] - float(rows[n - 1].max())) < TOL  # greedy: the best


def test_openai_echo_without_logprobs_prepends_the_prompt(e2e_server):
    import openai

    client = openai.OpenAI(base_url=e2e_server.openai_url, api_key="unused", max_retries=0, timeout=120)
    plain = client.completions.create(model="tritonkv-demo", prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="tritonkv-demo", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text and echoed.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tritonkv-demo", prompt=PROMPT, max_tokens=4, echo=True, stream=True)


def test_vllm_sampling_parameters_prompt_logprobs_equal_hf(e2e_server, hf_prompt):
    ids, rows = hf_prompt
    sampling = {"max_tokens": 2, "temperature": 0, "prompt_logprobs": 1}
    responses = grpc_responses(e2e_server.grpc_url, vllm_inputs(sampling, True, True))
    carrying = [r for r in responses if "prompt_logprobs" in r]
    assert len(carrying) == 1
    entries = json.loads(carrying[0]["prompt_logprobs"].reshape(-1)[0].decode("utf-8"))
    assert len(entries) == len(ids) and entries[0] is None
    for q in range(1, len(ids)):
        entry = entries[q]
        assert abs(entry[str(ids[q])]["logprob"] - float(rows[q - 1, ids[q]])) < TOL
        best = int(rows[q - 1].argmax())
        assert str(best) in entry and entry[str(best)]["rank"] == 1


def test_client_library_prompt_logprobs(e2e_server, hf_prompt):
    from tritonkv_client import Client

    ids, rows = hf_prompt
    with Client(e2e_server.grpc_url) as c:
        r = c.generate(PROMPT, max_tokens=2, temperature=0.0, prompt_logprobs=0)
    assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    got = [e[str(ids[q])]["logprob"] for q, e in enumerate(r.prompt_logprobs) if q > 0]
    assert max(abs(a - float(rows[q, ids[q + 1]])) for q, a in enumerate(got)) < TOL
