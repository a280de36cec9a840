"""Fine-tuning throughput: training tokens per second of the LoRA trainer on this box.

The trainer that jobs run (models.finetune.LoRATrainer) on the embedded default model,
synthetic chat examples of a fixed length, every projection targeted at r=8. Reported:
tokens per second over all tokens of each batch (OpenAI's `trained_tokens` count), after
one warm-up step, and the loss-carrying (assistant) share.

    python -m bench.finetune_bench [--size tiny] [--steps 20] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.chat_data import parse_chat_jsonl
from models.default_model import default_model_path, make_default
from models.finetune import LoRATrainer, TrainConfig, encode_dataset
from models.lora_files import TARGETS
from models.lora_train import LoRAShape


def examples(n: int, words: int) -> bytes:
    reply = " ".join(["the lighthouse keeper"] * (words // 3))
    return "\n".join(
        json.dumps({"messages": [{"role": "user", "content": f"Question {i}: {reply}"},
                                 {"role": "assistant", "content": reply}]})
        for i in range(n)
    ).encode()  # fmt: skip


def measure(size: str, steps: int, batch_size: int, words: int) -> dict[str, float]:
    path = default_model_path(size)  # type: ignore[arg-type]
    if not path.is_dir():
        make_default(size)  # type: ignore[arg-type]
    config = TrainConfig(
        model_path=str(path), base_name=size, lora=LoRAShape(8, 16, TARGETS),
        learning_rate=1e-3, n_epochs=1, batch_size=batch_size, seed=0, max_seq_len=4096,
    )  # fmt: skip
    trainer = LoRATrainer(config)
    data = encode_dataset(
        trainer.tokenizer, parse_chat_jsonl(examples((steps + 1) * batch_size, words)), 4096
    )
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]

    def step(batch: list) -> None:  # type: ignore[type-arg]
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(batch).backward()
        trainer.optimizer.step()

    step(batches[0])  # warm-up
    tokens = trained = 0
    start = time.perf_counter()
    for batch in batches[1 : steps + 1]:
        step(batch)
        tokens += sum(len(e.ids) for e in batch)
        trained += sum(e.trained_count for e in batch)
    seconds = time.perf_counter() - start
    return {
        "size": size,  # type: ignore[dict-item]
        "steps": len(batches[1 : steps + 1]),
        "batch_size": batch_size,
        "tokens_per_example": len(data[0].ids),
        "tokens_per_s": tokens / seconds,
        "assistant_share": trained / tokens,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--words", type=int, default=60, help="words per message")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.size, args.steps, args.batch_size, args.words)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
