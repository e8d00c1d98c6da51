"""``HealConfig`` and its one validator: no torch, so that a bad value is an error before anything heavy is
imported (the CLI builds its ``heal`` options from these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from flap_deploy.errors import ParameterError
from flap_deploy.streaming.memory import parse_size

DTYPES = ("float32", "bfloat16", "float16")
LORA_LR, FULL_LR = 2e-4, 2e-5


@dataclass
class HealConfig:
    """A distillation run from the dense model (the teacher) into a pruned checkpoint (the student).

    teacher: the dense checkpoint (directory or bundled name) whose next-token distributions the student learns;
        same tokenizer and vocabulary as the student.
    data: ``self`` (windows the teacher samples from BOS, as ``prune --calib self``) or a text file / directory
        (windows at seeded random positions).
    tokens: tokens trained on (whole batches of ``batch_size`` windows of ``seqlen``; at least one batch).
    lm_weight: weight of the next-token cross-entropy on the data beside the KL on the teacher's logits.
    temperature: both distributions softened by it in the KL (scaled back by its square).
    full: train every decoder weight instead of LoRA adapters (``lora_rank`` / ``lora_alpha``, default alpha
        twice the rank) on the kept linear layers; adapters are merged into the weights at the end.
    lr: AdamW's learning rate after ``warmup_steps`` of linear warm-up, then constant (so a run to N tokens
        is the first N tokens of a longer one, and a finished run resumes to more); default 2e-4 with LoRA,
        2e-5 with ``full``.
    checkpoint_every: steps between resumable training states.
    device / dtype: where and how the student and teacher run: ``auto`` (the first CUDA device, else the CPU);
        default bfloat16 autocast on accelerators (float32 master weights), float32 on the CPU.
    max_memory: host memory the run may use (default what the machine has available): the teacher's layers
        that do not fit beside the student are read from its safetensors on every forward.
    """

    teacher: str = ""
    data: str = "self"
    tokens: int = 131_072
    seqlen: int = 128
    batch_size: int = 8
    lm_weight: float = 0.0
    temperature: float = 1.0
    full: bool = False
    lora_rank: int = 16
    lora_alpha: float | None = None
    lr: float | None = None
    warmup_steps: int = 20
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"
    dtype: str | None = None
    max_memory: int | str | None = None
    progress: bool = True

    def validate(self) -> None:
        """One-line errors for values no run could use."""
        if not self.teacher:
            raise ParameterError("teacher", "is required: the dense checkpoint the pruned model was made from")
        for name in ("tokens", "seqlen", "batch_size", "lora_rank", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer, got {value}")
        if self.seqlen < 2:
            raise ParameterError("seqlen", f"must be at least 2, got {self.seqlen}")
        if self.tokens < self.batch_tokens:
            raise ParameterError("tokens", f"{self.tokens:,} is less than one batch ({self.batch_size} windows of "
                                           f"{self.seqlen} = {self.batch_tokens:,} tokens)")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ParameterError("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps}")
        for name in ("lm_weight",):
            if not getattr(self, name) >= 0:
                raise ParameterError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ParameterError(name, f"must be > 0, got {value}")
        if self.dtype not in (None, *DTYPES):
            raise ParameterError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        parse_size(self.max_memory, "max_memory")

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seqlen

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (FULL_LR if self.full else LORA_LR)

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def settings(self) -> dict:
        """What a resumed run must share with the state it continues (not the token budget, which may grow)."""
        keys = ("data", "seqlen", "batch_size", "lm_weight", "temperature", "full", "seed", "warmup_steps")
        out = {k: getattr(self, k) for k in keys}
        out["lr"] = self.learning_rate
        if not self.full:
            out.update(lora_rank=self.lora_rank, lora_alpha=self.alpha)
        return out
