"""The LoRA training core on the tiny default model (float32, CPU, a handful of steps):
tokens as the server renders them, loss on assistant tokens only, the loss falls, the
checkpoint loads in `peft` as it is and gives the engine's logits, resume replays exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.chat_data import ChatDataError, ChatExample, parse_chat_jsonl
from models.engine import LLMEngine
from models.engine_config import EngineConfig
from models.finetune import LoRATrainer, StepReport, TrainConfig, encode_dataset, encode_example
from models.lora import LoRARequest
from models.lora_train import LoRAShape, train_forward
from tests.lora_adapters import ALL_TARGETS, PeftReference, prefill_batch

pytest.importorskip("peft")

TOL = 1e-4  # as tests/test_lora_reference.py
REPLY = "The lighthouse keeper sleeps."


def examples(n: int = 4) -> list[ChatExample]:
    lines = [
        '{"messages": [{"role": "system", "content": "Answer."}, '
        f'{{"role": "user", "content": "Question {i}?"}}, '
        f'{{"role": "assistant", "content": "{REPLY}"}}]}}'
        for i in range(n)
    ]
    return parse_chat_jsonl("\n".join(lines).encode())


def config(model: Path, **kw: object) -> TrainConfig:
    values: dict = {
        "model_path": str(model),
        "base_name": str(model),
        "lora": LoRAShape(r=8, alpha=16, targets=tuple(ALL_TARGETS)),
        "learning_rate": 1e-2,
        "n_epochs": 3,
        "batch_size": 2,
        "seed": 7,
        "max_seq_len": 256,
    } | kw
    return TrainConfig(**values)


def test_tokens_are_the_servers_and_only_assistant_turns_carry_loss(
    tiny_model_dir: Path,
) -> None:
    trainer_tok = LoRATrainer(config(tiny_model_dir)).tokenizer
    two_turns = parse_chat_jsonl(
        b'{"messages": [{"role": "user", "content": "Hi"}, '
        b'{"role": "assistant", "content": "skip", "weight": 0}, '
        b'{"role": "user", "content": "Again"}, {"role": "assistant", "content": "learn"}]}'
    )[0]
    enc = encode_example(trainer_tok, two_turns)
    messages = two_turns.as_prompt()
    served_prompt = trainer_tok.encode_chat(messages[:3])  # what the ingress sends the engine
    assert enc.ids[: len(served_prompt)] == served_prompt
    assert not any(enc.trained[: len(served_prompt)])  # system, user, weight-0 turn: no loss
    trained = [t for t, on in zip(enc.ids, enc.trained, strict=True) if on]
    assert trainer_tok.decode(trained, skip_special_tokens=False) == "learn<|im_end|>"
    assert trained[-1] in trainer_tok.eos_token_ids
    assert enc.trained.index(True) == len(served_prompt)

    with pytest.raises(ChatDataError) as err:
        encode_dataset(trainer_tok, examples(3), max_seq_len=10)
    assert err.value.line == 1 and "over the limit of 10" in str(err.value)


def test_training_lowers_the_loss_and_the_checkpoint_is_peft_and_the_engines(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trainer = LoRATrainer(config(tiny_model_dir))
    data = encode_dataset(trainer.tokenizer, examples(), 256)
    reports: list[StepReport] = []
    result = trainer.train(data, tmp_path, on_step=lambda r: reports.append(r) or True)
    assert [r.step for r in reports] == list(range(1, 7)) and reports[-1].total_steps == 6
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert result.trained_tokens == 3 * sum(len(e.ids) for e in data)
    assert [c.step for c in result.checkpoints] == [2, 4, 6]
    ckpt = result.checkpoints[-1].path
    assert {p.name for p in ckpt.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    ids = data[0].ids
    with torch.no_grad():
        ours = train_forward(trainer.model, trainer.lora, torch.tensor([ids]))[0]
    reference = PeftReference(tiny_model_dir, {"ft": ckpt})  # peft.PeftModel.from_pretrained
    peft_logits = reference.logits("ft", ids)
    assert (ours - peft_logits).abs().max().item() <= TOL
    assert (peft_logits - reference.logits(None, ids)).abs().max().item() > 0.1  # it learned

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_loras=1))
    lora = LoRARequest("ft", 1, str(ckpt))
    engine.load_lora(lora)
    served = engine.runner.execute(prefill_batch(engine, [(lora, ids)]))
    assert served is not None
    assert (served - peft_logits).abs().max().item() <= TOL
    engine.shutdown()


def test_resume_from_a_checkpoint_replays_the_same_run_and_stop_halts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    whole = LoRATrainer(config(tiny_model_dir, n_epochs=2))
    data = encode_dataset(whole.tokenizer, examples(), 256)
    full = whole.train(data, tmp_path / "whole")

    first = LoRATrainer(config(tiny_model_dir, n_epochs=2))
    stopped = first.train(data, tmp_path / "cut", on_step=lambda r: r.step < 3)
    assert stopped.stopped and stopped.steps == 3 and len(stopped.checkpoints) == 1

    resumed = LoRATrainer(config(tiny_model_dir, n_epochs=2))
    rest = resumed.train(data, tmp_path / "cut", resume=stopped.checkpoints[0].path)
    assert rest.steps == 4 and rest.losses == pytest.approx(full.losses[2:], abs=1e-6)
    assert rest.trained_tokens == full.trained_tokens
    for key in whole.lora.b:
        assert torch.allclose(resumed.lora.b[key], whole.lora.b[key], atol=1e-6), key
