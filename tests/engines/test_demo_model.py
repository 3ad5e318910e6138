"""The built-in demo model: deterministic files, loadable like any local model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streaming_llm.engines import demo_model


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_written_deterministically(tmp_path: Path) -> None:
    a = demo_model.ensure_demo_model(tmp_path / "a")
    b = demo_model.ensure_demo_model(tmp_path / "b")
    files_a, files_b = _files(a), _files(b)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files_a)
    assert files_a == files_b
    # Only the model directory is left behind: the temporary build directory was renamed.
    assert [p.name for p in (tmp_path / "a").iterdir()] == [demo_model.DIRNAME]


def test_loads_with_from_pretrained_and_chats(tmp_path: Path) -> None:
    path = demo_model.ensure_demo_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 4096
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello 日本語 🎉"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHello 日本語 🎉<|end|>\n<|assistant|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Byte-level: the emoji alone is four tokens, so streaming must handle split characters.
    assert len(tokenizer("🎉", add_special_tokens=False)["input_ids"]) == 4

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_reused_when_current_and_rebuilt_when_stale(tmp_path: Path) -> None:
    path = demo_model.ensure_demo_model(tmp_path)
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert demo_model.ensure_demo_model(tmp_path) == path
    assert weights.stat().st_mtime_ns == before  # not rewritten

    (path / "DEMO_MODEL_VERSION").write_text("0\n")  # an older version left by an old release
    (path / "model.safetensors").write_bytes(b"broken")
    assert demo_model.ensure_demo_model(tmp_path) == path
    assert demo_model.is_current(path)
    AutoModelForCausalLM.from_pretrained(path)  # the broken weights were replaced
    assert [p.name for p in tmp_path.iterdir()] == [demo_model.DIRNAME]
