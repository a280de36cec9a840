"""Supervised LoRA fine-tuning on chat examples: the training core a job runner calls.

Tokens are rendered with the chat template the server uses (`Tokenizer.encode_chat`): the
prompt of each assistant turn is exactly what the ingress sends the engine for that
conversation (generation prompt included), and the turn's tokens, up to and including the
end-of-turn token, carry the loss. Every other token (system, user, template text,
padding, assistant turns with weight 0) carries none. Batches are drawn in a seeded order
per epoch, so a run resumed from a checkpoint replays the same steps. A checkpoint (PEFT
format, plus the optimizer and the step) is written at the end of every epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.chat_data import ChatDataError, ChatExample
from models.config import ModelConfig
from models.default_model import resolve_model_path
from models.lora_train import LoRAShape, TrainableLoRA, train_forward
from models.tokenizer import Tokenizer
from models.tp import single_process
from models.weights import load_model

STATE_FILE = "trainer_state.pt"
PAD_ID = 0


@dataclass(frozen=True)
class TrainConfig:
    model_path: str  # a checkpoint directory or "default:<size>"
    base_name: str  # written as base_model_name_or_path
    lora: LoRAShape
    learning_rate: float
    n_epochs: int
    batch_size: int
    seed: int
    max_seq_len: int
    dtype: str = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class EncodedExample:
    ids: list[int]
    trained: list[bool]  # per token: an assistant target (carries the loss)

    @property
    def trained_count(self) -> int:
        return sum(self.trained)


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based
    total_steps: int
    epoch: int  # 1-based
    train_loss: float
    trained_tokens: int  # all tokens of every example processed so far (OpenAI's count)


@dataclass(frozen=True)
class CheckpointReport:
    step: int
    epoch: int
    path: Path
    train_loss: float  # the mean over the epoch's steps


@dataclass
class TrainResult:
    steps: int
    trained_tokens: int
    losses: list[float] = field(default_factory=list)
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    stopped: bool = False  # on_step asked to stop (a cancel)


def encode_example(tokenizer: Tokenizer, example: ChatExample) -> EncodedExample:
    """The conversation's tokens and which carry the loss; ChatDataError(0, ...) if the
    template does not render the conversation as a prefix-stable sequence of turns."""
    messages = example.as_prompt()
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trained = [False] * len(full)
    for i, message in enumerate(example.messages):
        if not message.trained:
            continue
        prompt = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if full[: len(through)] != through or through[: len(prompt)] != prompt:
            raise ChatDataError(
                0, "the chat template does not render this conversation turn by turn"
            )
        end = len(through)
        for k in range(len(prompt), len(through)):
            if through[k] in tokenizer.eos_token_ids:
                end = k + 1  # the end-of-turn token is learned; template text after it is not
                break
        trained[len(prompt) : end] = [True] * (end - len(prompt))
    return EncodedExample(full, trained)


def encode_dataset(
    tokenizer: Tokenizer, examples: Sequence[ChatExample], max_seq_len: int
) -> list[EncodedExample]:
    """Every example encoded; ChatDataError naming the example (1-based) that is too long
    or has nothing to train on."""
    encoded = []
    for n, example in enumerate(examples, start=1):
        try:
            enc = encode_example(tokenizer, example)
        except ChatDataError as exc:
            raise ChatDataError(n, exc.reason) from None
        if len(enc.ids) > max_seq_len:
            raise ChatDataError(
                n, f"the example is {len(enc.ids)} tokens, over the limit of {max_seq_len}"
            )
        if not enc.trained_count:
            raise ChatDataError(n, "no assistant tokens to train on")
        encoded.append(enc)
    return encoded


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _collate(
    examples: list[EncodedExample], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and the loss mask of the *predicted* tokens [B, L-1]."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = torch.tensor(e.trained)
    return ids.to(device), mask[:, 1:].to(device)


class LoRATrainer:
    """The base model loaded once (frozen), one adapter trained on it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model_path)
        self.model_config = ModelConfig.from_pretrained(path)
        self.tokenizer = Tokenizer.from_pretrained(path)
        parallel = single_process(config.device)
        dtype = getattr(torch, config.dtype)
        self.model = load_model(path, self.model_config, parallel, dtype)
        self.model.requires_grad_(False)
        torch.manual_seed(config.seed)
        self.lora = TrainableLoRA(self.model, config.lora).to(dtype)
        self.optimizer = torch.optim.AdamW(
            self.lora.parameters(), lr=config.learning_rate, weight_decay=0.0
        )
        self.device = parallel.device

    def loss(self, batch: list[EncodedExample]) -> torch.Tensor:
        ids, mask = _collate(batch, self.device)
        logits = train_forward(self.model, self.lora, ids)[:, :-1]
        targets = ids[:, 1:]
        return F.cross_entropy(logits[mask], targets[mask])

    @torch.no_grad()
    def evaluate(self, examples: list[EncodedExample]) -> float:
        """The loss over `examples` (a validation set), token-weighted."""
        total, count = 0.0, 0
        for start in range(0, len(examples), self.config.batch_size):
            batch = examples[start : start + self.config.batch_size]
            tokens = sum(e.trained_count - e.trained[0] for e in batch)  # predicted positions
            total += float(self.loss(batch)) * tokens
            count += tokens
        return total / count

    def train(
        self,
        examples: list[EncodedExample],
        output: Path,
        on_step: Callable[[StepReport], bool] = lambda _: True,
        on_checkpoint: Callable[[CheckpointReport], None] = lambda _: None,
        resume: Path | None = None,
    ) -> TrainResult:
        """Train, writing output/checkpoint-<step> after each epoch. `on_step` returning
        False stops the run after that step (no checkpoint). `resume` is a checkpoint
        directory this trainer wrote: its weights, optimizer and step are restored."""
        cfg = self.config
        per_epoch = -(-len(examples) // cfg.batch_size)
        total = per_epoch * cfg.n_epochs
        done = 0
        if resume is not None:
            self.lora.load_peft(resume)
            state = torch.load(resume / STATE_FILE, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            done = int(state["step"])
        result = TrainResult(steps=done, trained_tokens=0)
        step = 0
        for epoch in range(1, cfg.n_epochs + 1):
            epoch_losses = []
            for batch in _batches(len(examples), cfg.batch_size, cfg.seed, epoch):
                step += 1
                result.trained_tokens += sum(len(examples[i].ids) for i in batch)
                if step <= done:  # replayed from the checkpoint: same order, same count
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss([examples[i] for i in batch])
                loss.backward()
                self.optimizer.step()
                value = float(loss.detach())
                result.losses.append(value)
                epoch_losses.append(value)
                result.steps = step
                report = StepReport(step, total, epoch, value, result.trained_tokens)
                if not on_step(report):
                    result.stopped = True
                    return result
            if step > done:
                checkpoint = self._save(output / f"checkpoint-{step}", step)
                mean = sum(epoch_losses) / len(epoch_losses)
                saved = CheckpointReport(step, epoch, checkpoint, mean)
                result.checkpoints.append(saved)
                on_checkpoint(saved)
        return result

    def _save(self, directory: Path, step: int) -> Path:
        self.lora.save_peft(directory, self.config.base_name)
        state = {"step": step, "optimizer": self.optimizer.state_dict()}
        torch.save(state, directory / STATE_FILE)
        return directory
