"""The lean greedy loop (`pathvlm.model.fast_decode`) gives `generate`'s tokens, and hands every
call it does not implement back to `generate`."""

from __future__ import annotations

import pytest
import torch

from pathvlm.model import fast_decode
from pathvlm.model.fast_decode import GreedyDecoder, call_unsupported, unsupported

TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
QUESTIONS = ["What tissue is shown?", "Describe the main findings on this slide.", "Is there tumour? Answer yes or no."]


@pytest.fixture(scope="module")
def tiny():
    from pathvlm.model import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(feature_dim=16, n_tokens=4, hidden_dim=32, llm_config=TINY_LLM,
                                   max_case_tokens=8))


def _bag(seed: int) -> torch.Tensor:
    return torch.randn(20, 16, generator=torch.Generator().manual_seed(seed))


def _both(model, precision: str, **gen) -> list[tuple[list[int], list[int]]]:
    model.set_precision(precision)
    out = []
    for i, q in enumerate(QUESTIONS):
        model.fast_decode = False
        ref = model.generate_ids(_bag(i), q, **gen)[0].tolist()
        model.fast_decode = True
        out.append((ref, model.generate_ids(_bag(i), q, **gen)[0].tolist()))
    model.set_precision("fp32")
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_greedy_tokens_equal_generate(tiny, precision, monkeypatch):
    calls = []
    real = GreedyDecoder.generate
    monkeypatch.setattr(GreedyDecoder, "generate", lambda self, **kw: calls.append(1) or real(self, **kw))
    for ref, fast in _both(tiny, precision, max_new_tokens=24):
        assert fast == ref and len(ref) == 24
    assert len(calls) == len(QUESTIONS)  # the lean loop answered, generate only made the references


def test_end_of_sequence_and_min_new_tokens_stop_as_generate_does(tiny):
    tiny.fast_decode = False
    free = tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=12)[0].tolist()
    tiny.fast_decode = True
    eos = tiny.llm.generation_config.eos_token_id
    try:
        tiny.llm.generation_config.eos_token_id = [free[3]]  # a token the model emits at step 4
        for gen in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "min_new_tokens": 6}):
            pairs = [(r, f) for r, f in _both(tiny, "fp32", **gen)]
            assert all(r == f for r, f in pairs)
        ref, _ = _both(tiny, "fp32", max_new_tokens=12)[0]
        assert len(ref) <= 4 and ref[-1] == free[3]  # stopped at the end-of-sequence token, kept it
    finally:
        tiny.llm.generation_config.eos_token_id = eos


def test_streamed_answer_equals_the_asked_one(tiny):
    text = tiny.ask(_bag(1), QUESTIONS[1], route=False, max_new_tokens=16)
    assert "".join(tiny.stream(_bag(1), QUESTIONS[1], route=False, max_new_tokens=16)).strip() == text


def test_decoder_rebuilt_when_the_weights_change(tiny):
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)
    first = tiny._decoder
    assert first is not None and not first.stale
    tiny.set_precision("bf16")
    assert first.stale
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)
    assert tiny._decoder is not first and tiny._decoder.layers[0]["qkv"].dtype == torch.bfloat16
    tiny.set_precision("fp32")


def test_what_the_lean_loop_does_not_implement_goes_to_generate(tiny, monkeypatch):
    embeds = torch.zeros(1, 5, 64)
    assert call_unsupported({"inputs_embeds": embeds, "max_new_tokens": 4, "do_sample": False}) is None
    assert "do_sample" in call_unsupported({"inputs_embeds": embeds, "max_new_tokens": 4, "do_sample": True})
    assert "repetition_penalty" in call_unsupported({"inputs_embeds": embeds, "max_new_tokens": 4,
                                                     "repetition_penalty": 1.2})
    assert "top_k" in call_unsupported({"inputs_embeds": embeds, "max_new_tokens": 4, "top_k": 5})
    assert "padded" in call_unsupported({"inputs_embeds": embeds, "max_new_tokens": 4,
                                         "attention_mask": torch.tensor([[0, 1, 1, 1, 1]])})
    assert "one sequence" in call_unsupported({"inputs_embeds": torch.zeros(2, 5, 64), "max_new_tokens": 4})
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny.llm, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        assert "projection" in unsupported(wrapped.base_model.model)  # LoRA layers are not nn.Linear
    finally:
        wrapped.unload()
    monkeypatch.setattr(GreedyDecoder, "generate", lambda self, **kw: pytest.fail("lean loop used"))
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=3, repetition_penalty=1.3)
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=3, do_sample=True)
    monkeypatch.setattr(fast_decode, "unsupported", lambda llm: "another architecture")
    tiny._decoder = None
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=3)
    assert tiny._decoder is None


@pytest.mark.llm
def test_smollm2_greedy_tokens_equal_generate_in_fp32_and_bf16():
    """The shipped LLM (SmolLM2-135M), 32 new tokens a question: the lean loop's tokens are
    generate's in fp32 and in bf16."""
    from pathvlm.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_dim=16, n_tokens=4, hidden_dim=32, max_case_tokens=8))
    assert unsupported(model.llm) is None
    for precision in ("fp32", "bf16"):
        for ref, fast in _both(model, precision, max_new_tokens=32):
            assert fast == ref, precision


def test_the_models_generation_config_is_followed_or_sends_the_call_to_generate(tiny, monkeypatch):
    gc = tiny.llm.generation_config
    eos = gc.eos_token_id
    tiny.fast_decode = False
    free = tiny.generate_ids(_bag(2), QUESTIONS[0], max_new_tokens=10)[0].tolist()
    tiny.fast_decode = True
    try:  # the model's own min_new_tokens holds when the call gives none
        gc.eos_token_id, gc.min_new_tokens = [free[1]], 6
        assert all(r == f for r, f in _both(tiny, "fp32", max_new_tokens=10))
    finally:
        gc.eos_token_id, gc.min_new_tokens = eos, None
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)  # a decoder is built
    monkeypatch.setattr(GreedyDecoder, "generate", lambda self, **kw: pytest.fail("lean loop used"))
    before = gc.no_repeat_ngram_size
    try:  # set after the decoder was built: checked on every call
        gc.no_repeat_ngram_size = 2
        tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=3)
    finally:
        gc.no_repeat_ngram_size = before
    assert fast_decode.config_unsupported(gc) is None


def test_a_weight_changed_in_any_layer_or_a_replaced_llm_rebuilds_the_decoder(tiny):
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)
    built = tiny._decoder
    with torch.no_grad():
        tiny.llm.model.layers[-1].mlp.up_proj.weight.add_(0.0)  # an optimizer step is in place
    assert built.stale
    tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)
    rebuilt = tiny._decoder
    assert rebuilt is not built and not rebuilt.stale
    original = tiny.llm
    try:
        tiny.llm = torch.nn.Module()  # e.g. a PEFT wrapper put in its place
        with pytest.raises(Exception):  # noqa: B017 - not a Llama any more: generate is asked, and fails here
            tiny.generate_ids(_bag(0), QUESTIONS[0], max_new_tokens=2)
        assert tiny._decoder is rebuilt  # never used for another LLM object
    finally:
        tiny.llm = original
