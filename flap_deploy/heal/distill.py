"""Heal: a short distillation of a pruned checkpoint from the dense model it was pruned from.

The loss is KL(teacher || student) of the next-token distributions at every position of the training windows
(softened by ``temperature``), plus ``lm_weight`` times the next-token cross-entropy on the data. By default
LoRA adapters (peft) train on every kept linear layer (q/k/v/o, gate/up/down of the layers that keep them) and
are merged into the weights at the end; ``full`` trains every decoder weight (norms and compensation biases
included; embeddings and LM head stay). The output is a regular pruned checkpoint: the same widths, the
compensation biases still biases, the provenance extended with the heal.

The student trains resident (float32 master weights, bfloat16 autocast on accelerators); the teacher runs
through a ``LayerStream``: resident when it fits beside the student, else with the layers that do not fit read
from its safetensors on every forward. Everything the user gave is checked before any model weight is read
(``check_inputs``); training states are written every ``checkpoint_every`` steps, so a stopped run resumes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.model_ref import ModelRef
from flap_deploy.streaming.memory import GIB

from .config import HealConfig
from .state import HealState, check_state_dir, load_state, save_state

GRAD_CLIP = 1.0  # max gradient norm: the first steps' KL gradients are large where the pruned model is far off
SELF_BATCH = 128  # self-generated windows come in whole batches, so a shorter run's windows begin a longer one's


@dataclass
class Inputs:
    """A heal run's inputs, checked: the student and teacher checkpoints, the tokenizer, the text (or None for
    ``self``), where the output and the training state go."""

    student: ModelRef
    teacher: ModelRef
    tokenizer: Any
    text_ids: torch.Tensor | None
    out: Path
    state_dir: Path


def default_state_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".heal-state")


def check_inputs(student: str | os.PathLike, out: str | os.PathLike, config: HealConfig, *, resume: bool = False,
                 state_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Inputs:
    """Every check that needs no weights, in the order a user fixes them: settings, output, models, vocabulary,
    data, training state. Raises a one-line error; writes nothing."""
    from flap_deploy.io.atomic import check_output_dir
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

    config.validate()
    out = check_output_dir(out, overwrite)
    student_ref = resolve_model(student, accept=("pruned",))
    try:
        teacher_ref = resolve_model(config.teacher, accept=CHECKPOINTS)
    except FlapDeployError as e:
        raise ParameterError("teacher", str(e)) from None
    tokenizer = _same_vocabulary(student_ref, teacher_ref)
    text_ids = None
    if config.data != "self":
        text_ids = _text_tokens(config, tokenizer)
    root = Path(state_dir) if state_dir is not None else default_state_dir(out)
    check_state_dir(root, resume)
    return Inputs(student_ref, teacher_ref, tokenizer, text_ids, out, root)


def _same_vocabulary(student: ModelRef, teacher: ModelRef) -> Any:
    """The student's tokenizer, once the teacher's vocabulary and tokenizer are shown to be the same."""
    sv, tv = student.config.get("vocab_size"), teacher.config.get("vocab_size")
    if sv != tv:
        raise ParameterError("teacher", f"{teacher.path}: vocabulary of {tv} tokens, the student's {student.path} "
                                        f"has {sv}: distillation needs the same tokenizer")
    tokenizers = []
    for ref in (student, teacher):
        try:
            tokenizers.append(ref.tokenizer())
        except FlapDeployError:
            tokenizers.append(None)
    s_tok, t_tok = tokenizers
    if s_tok is not None and t_tok is not None:
        s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
        if s_vocab != t_vocab:
            differ = sum(1 for k in set(s_vocab) | set(t_vocab) if s_vocab.get(k) != t_vocab.get(k))
            raise ParameterError("teacher", f"{teacher.path}: its tokenizer differs from the student's ({differ:,} "
                                            "tokens map to other ids): distillation needs the same tokenizer")
    return s_tok if s_tok is not None else t_tok


def _text_tokens(config: HealConfig, tokenizer: Any) -> torch.Tensor:
    from flap_deploy.io.text import load_text

    path = Path(config.data)
    if not path.exists():
        raise ParameterError("data", f"{path}: no such file or directory (a text file, a directory of text files, "
                                     "or 'self')")
    if tokenizer is None:
        raise ParameterError("data", f"{path} needs a tokenizer, and neither checkpoint has one; use 'self'")
    try:
        text = load_text(path)
    except FlapDeployError as e:
        raise ParameterError("data", str(e).removeprefix("text ")) from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                       dtype=torch.long)
    if ids.numel() < config.seqlen:
        raise ParameterError("data", f"{path} has {ids.numel()} tokens, fewer than one window of {config.seqlen}")
    return ids


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                      lm_weight: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) per position (softened by ``temperature``, scaled back by its square), plus
    ``lm_weight`` times the next-token cross-entropy of the student on ``ids``."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    loss = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    return loss


@dataclass
class HealResult:
    path: Path
    record: dict[str, Any]  # what the provenance keeps
    losses: list[float]
    seconds: float
    tokens_per_s: float
    plan: str


def _kept_linears(model: torch.nn.Module) -> list[str]:
    """Names of the decoder's kept linear layers (a removed module's compensation bias is no linear layer)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def _plan(config: HealConfig, inputs: Inputs, device: torch.device, teacher_bytes: int, student_bytes: int,
          trainable: int) -> tuple[int, str]:
    """Bytes the teacher may keep resident, and the plan line that says it."""
    from flap_deploy.streaming.memory import (
        available_memory_bytes,
        parse_size,
        rss_bytes,
    )

    vocab = inputs.student.config["vocab_size"]
    logits = 6 * config.batch_tokens * vocab * 4  # student and teacher logits, log-probs, the gradient
    train = student_bytes + trainable * 4 * 3  # weights; gradients and AdamW's moments of what trains
    limit = parse_size(config.max_memory, "max_memory") or available_memory_bytes()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budget = max(free - train - logits, 0)
    else:
        budget = max(limit - rss_bytes() - train - logits, 0)
    where = "resident" if teacher_bytes <= budget else f"streamed ({budget / GIB:.2f} GiB of it held)"
    text = (f"heal plan: student {student_bytes / GIB:.2f} GiB trained resident "
            f"({'all decoder weights' if config.full else f'LoRA rank {config.lora_rank}'}: {trainable:,} trainable "
            f"parameters), teacher {teacher_bytes / GIB:.2f} GiB {where}, logits {logits / GIB:.2f} GiB a step "
            f"({config.batch_size} x {config.seqlen} tokens); {config.steps} steps, {config.steps * config.batch_tokens:,} "
            f"tokens on {device}")
    return budget, text


def heal(student: str | os.PathLike, out: str | os.PathLike, config: HealConfig, *, resume: bool = False,
         state_dir: str | os.PathLike | None = None, keep_state: bool = False, overwrite: bool = False,
         on_plan: Any = None) -> HealResult:
    """Distill ``student`` (a pruned checkpoint) from ``config.teacher`` and write the healed checkpoint to
    ``out``. ``resume`` continues the newest training state in ``state_dir`` (default ``OUT.heal-state``),
    which is removed at the end unless ``keep_state`` (a kept state resumes to a larger ``tokens``)."""
    from flap_deploy.io.card import write_card
    from flap_deploy.io.checkpoint import save_checkpoint
    from flap_deploy.streaming.layers import LayerStream, resolve_device, resolve_dtype

    inputs = check_inputs(student, out, config, resume=resume, state_dir=state_dir, overwrite=overwrite)
    device = resolve_device(config.device)
    autocast_dtype = resolve_dtype(config.dtype, device, torch.bfloat16)
    model = inputs.student.load(torch.float32).to(device)
    stored = getattr(torch, str(inputs.student.config.get("dtype") or "float32"))  # what the pruner wrote
    student = _trainable(model, config)
    trainable = [p for p in student.parameters() if p.requires_grad]
    teacher_stream = LayerStream.open(inputs.teacher, device=device, dtype=autocast_dtype)
    budget, plan = _plan(config, inputs, device, teacher_stream.checkpoint_nbytes(),
                         sum(p.numel() * 4 for p in model.parameters()), sum(p.numel() for p in trainable))
    _say(config, plan)
    if on_plan is not None:
        on_plan(plan)

    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    state = HealState()
    settings = {**config.settings(), "student": str(inputs.student.path), "teacher": str(inputs.teacher.path)}
    if resume:
        state, _ = load_state(inputs.state_dir, settings)
        if state.step > config.steps:
            raise ParameterError("tokens", f"{config.tokens:,} is fewer than the {state.step * config.batch_tokens:,} "
                                           f"the heal state {inputs.state_dir} already trained")
        with torch.no_grad():
            params = dict(student.named_parameters())
            for n in names:
                params[n].copy_(state.trainable[n])
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)

    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype != torch.float32
                else contextlib.nullcontext())
    with teacher_stream.paged(budget) as teacher:
        windows, data = _windows(config, inputs, teacher)
        state = _train(student, teacher, optimizer, names, windows, config, state, inputs, settings, data, autocast,
                       device)
    del teacher_stream

    merged = student.merge_and_unload() if not config.full else student
    merged = merged.to(device="cpu", dtype=stored)
    steps = config.steps
    record = {
        "teacher": inputs.teacher.name, "teacher_path": str(inputs.teacher.path), "data": data,
        "tokens": steps * config.batch_tokens, "steps": steps, "batch_size": config.batch_size, "seqlen": config.seqlen,
        "mode": "full" if config.full else "lora",
        **({} if config.full else {"lora_rank": config.lora_rank, "lora_alpha": config.alpha}),
        "lr": config.learning_rate, "warmup_steps": config.warmup_steps, "lm_weight": config.lm_weight,
        "temperature": config.temperature, "loss": "KL(teacher || student) per token"
        + (f" + {config.lm_weight:g} x next-token cross-entropy" if config.lm_weight else ""),
        "final_loss": _final_loss(state.losses), "seed": config.seed,
    }
    flap = dict(merged.config.flap or {})
    flap["heal"] = [*_as_list(flap.get("heal")), record]
    merged.config.flap = flap
    merged.config.dtype = stored
    path = save_checkpoint(merged, inputs.out, tokenizer_from=inputs.student.path, overwrite=overwrite)
    write_card(path, merged.config.to_dict(), source=inputs.student.path)  # every pruned checkpoint has its card
    if not keep_state:
        shutil.rmtree(inputs.state_dir, ignore_errors=True)
    tokens = steps * config.batch_tokens
    return HealResult(path, record, state.losses, state.seconds, tokens / max(state.seconds, 1e-9), plan)


def _as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _final_loss(losses: list[float]) -> float | None:
    """The mean loss of the last steps (one step's loss is noisy)."""
    tail = losses[-min(len(losses), 20):]
    return sum(tail) / len(tail) if tail else None


def _trainable(model: torch.nn.Module, config: HealConfig) -> torch.nn.Module:
    """The student with what trains marked: LoRA adapters on the kept linear layers, or every decoder weight."""
    if config.full:
        for name, p in model.named_parameters():
            p.requires_grad_(".layers." in name or name.startswith("model.norm."))
        return model.train()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise FlapDeployError("heal with LoRA needs the 'peft' package (pip install 'flap-deploy[heal]'), or use "
                              "--full") from None
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                      target_modules=_kept_linears(model))
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: seeded, so runs repeat
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora).train()


def _windows(config: HealConfig, inputs: Inputs, teacher: torch.nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
    """Every training window, in the order they are trained on, and the data's description for the provenance.
    A run to fewer tokens trains on the first windows of a longer one (same source, sizes and seed)."""
    from safetensors.torch import load_file, save_file

    from flap_deploy.pruning.calibration import random_windows, self_generated

    n = config.steps * config.batch_size
    if inputs.text_ids is not None:
        windows = random_windows(inputs.text_ids, n, config.seqlen, config.seed, config.data)
        return windows, {"source": config.data, "windows": n, "seqlen": config.seqlen, "seed": config.seed}
    # Generating is a forward per token: the windows are kept with the training state, for a resumed run.
    cache = inputs.state_dir / "self-windows.safetensors"
    windows = load_file(str(cache))["windows"] if cache.is_file() else None
    if windows is None or windows.shape[0] < n:
        count = math.ceil(n / SELF_BATCH) * SELF_BATCH
        windows = self_generated(teacher, inputs.tokenizer, count, config.seqlen, config.seed, batch_size=SELF_BATCH,
                                 progress=config.progress)
        inputs.state_dir.mkdir(parents=True, exist_ok=True)
        save_file({"windows": windows}, str(cache))
    return windows[:n], {"source": "self", "windows": n, "seqlen": config.seqlen, "seed": config.seed}


def _train(student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
           windows: torch.Tensor, config: HealConfig, state: HealState, inputs: Inputs, settings: dict[str, Any],
           data: dict[str, Any], autocast: Any, device: torch.device) -> HealState:
    from tqdm.auto import tqdm

    params = dict(student.named_parameters())
    trainable = [params[n] for n in names]
    bar = tqdm(total=config.steps * config.batch_tokens, initial=state.step * config.batch_tokens, desc="heal",
               unit="tok", unit_scale=True, disable=not config.progress)
    started, done = time.perf_counter(), 0
    extra = {"data": data}

    def checkpoint() -> None:
        state.trainable = {n: params[n] for n in names}
        state.optimizer = optimizer.state_dict()
        save_state(inputs.state_dir, state, settings, extra)

    for step in range(state.step, config.steps):
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = config.learning_rate * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        ids = windows[step * config.batch_size:(step + 1) * config.batch_size].to(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        with autocast:
            student_logits = student(input_ids=ids, use_cache=False).logits
        loss = distillation_loss(student_logits, teacher_logits, ids, config.lm_weight, config.temperature)
        del teacher_logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.losses.append(loss.item())
        state.seconds += time.perf_counter() - t0
        state.step = step + 1
        done += config.batch_tokens
        bar.update(config.batch_tokens)
        bar.set_postfix_str(f"loss {_final_loss(state.losses):.4f}, {done / (time.perf_counter() - started):,.0f} tok/s")
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            checkpoint()
    bar.close()
    return state


def _say(config: HealConfig, text: str) -> None:
    if config.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"flap-deploy: {text}", file=__import__("sys").stderr)
