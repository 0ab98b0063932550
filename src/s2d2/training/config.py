"""What determines a training run (:class:`TrainConfig`), apart from the training code so that the command line can
build ``s2d2 train``'s flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from s2d2.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved next to the checkpoint)."""

    out: str
    seed: int = 0
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    block_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    block_weights: tuple[float, ...] = (0.4, 0.15, 0.15, 0.15, 0.15)
    num_train: int = 200_000
    # the word-problem tasks (s2d2.evaluation.tasks) the num_train training problems come from, and their shares
    tasks: tuple[str, ...] = ("arith",)
    task_weights: tuple[float, ...] = (1.0,)
    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_positions: int = 512
    eval_every: int = 500
    eval_n: int = 200
    checkpoint_every: int = 100
    threads: int = 2
    drill_fraction: float = 0.2
    precision: str = "bf16"
    # word-problem batches of similar length: each run of length_buckets steps shares a pool of that many batches,
    # sorted by length (1 = off: every step draws its own batch). A batch is padded to its longest example and its
    # noisy stream starts at its shortest prompt, so mixed lengths waste rows (measured on the v3 mix: 2.1x the
    # useful rows; 1.13x with 16 buckets)
    length_buckets: int = 1
    # torch.compile the model's layers for the steps (forward and backward; where compilation fails, one warning
    # and eager steps). Measured on the 2-core CPU, the v4 recipe's steps 100-270 (the same batches, seeded): mean
    # 1.26 s eager, 0.81 s compiled (1.57x), after about two minutes of compiling
    compile: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.drill_fraction < 1.0:
            raise ConfigError(f"drill_fraction must be in [0, 1), got {self.drill_fraction}.")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}.")
        if len(self.block_sizes) != len(self.block_weights) or 1 not in self.block_sizes:
            raise ConfigError("block_sizes must include 1 and match block_weights in length.")
        if not self.tasks or len(self.tasks) != len(self.task_weights) or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks must be distinct, at least one, and match task_weights in length.")
        from s2d2.evaluation.tasks import task_module

        for task in self.tasks:
            task_module(task, "train")
        if any(not w > 0 for w in self.task_weights):
            raise ConfigError(f"task_weights must be positive, got {self.task_weights!r}.")
        for name in ("steps", "batch_size", "num_train", "vocab_size", "hidden_size", "num_layers", "length_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1.")
