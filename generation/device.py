"""Where the generation stage computes: device choice, mixed precision and the multi-GPU runtime.

Device strings (``StageConfig.device``, ``SamplingConfig.device``): ``"cpu"`` (the default),
``"cuda"`` (the current CUDA device, normally ``cuda:0``), ``"cuda:N"``, or a bare index ``"N"``
meaning ``"cuda:N"`` (the flows' ``device: "0"``). Asking for CUDA where
``torch.cuda.is_available()`` is False is an :class:`~aerosynth.data.errors.InputError` naming the field.

Mixed precision (``mixed_precision``): ``"no"`` (default), ``"fp16"`` or ``"bf16"``. It is
``torch.autocast`` around the UNet and text-encoder forward passes on CUDA (the autoencoder and
the losses stay in fp32; fp16 training adds a ``torch.amp.GradScaler``). **Rule on CPU:** any
value other than ``"no"`` with a CPU device is refused with an InputError naming the field, so
that a CPU run never silently differs from what its config says.

Random numbers never come from the device: noise is drawn by CPU ``torch.Generator`` objects
seeded from the config and then moved, so image ``i`` of a set depends only on ``base_seed + i``
and the CPU path is unchanged by any of this.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from aerosynth.data.errors import InputError

MIXED_PRECISION = ("no", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_CUDA = re.compile(r"^(?:cuda(?::(\d+))?|(\d+))$")


def resolve_device(value: str | int | torch.device | None, field: str = "device") -> torch.device:
    """Parse a device string into a :class:`torch.device`.

    Args:
        value: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"N"`` (an int ``N`` too); ``None`` means ``"cpu"``.
        field: the config field named in errors (``"StageConfig.device"``...).

    Raises:
        InputError: an unknown device string, CUDA asked for but not available, or an index
            beyond the visible CUDA devices.
    """
    if value is None:
        return torch.device("cpu")
    text = str(value).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(text)
    if match is None:
        raise InputError(field, f"unknown device {value!r}; use 'cpu', 'cuda', 'cuda:N' or a GPU index such as '0'")
    index_text = match.group(1) or match.group(2)
    if not torch.cuda.is_available():
        raise InputError(
            field,
            f"device {value!r} asks for CUDA but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device 'cpu'",
        )
    if index_text is None:
        return torch.device("cuda")
    index = int(index_text)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(field, f"device {value!r}: CUDA device {index} does not exist ({count} visible)")
    return torch.device("cuda", index)


def check_mixed_precision(value: str, device: torch.device, field: str = "mixed_precision") -> str:
    """Validate ``mixed_precision`` for a device (see the module docstring for the CPU rule).

    Raises:
        InputError: unknown value, a value other than ``"no"`` on CPU, or bf16 on a GPU without it.
    """
    text = str(value).strip().lower()
    if text not in MIXED_PRECISION:
        raise InputError(field, f"unknown mixed precision {value!r}; choose one of {list(MIXED_PRECISION)}")
    if text != "no" and device.type != "cuda":
        raise InputError(field, f"{text} autocast runs on CUDA only; use mixed_precision 'no' with device {device}")
    if text == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError(field, "bf16 is not supported by this GPU; use 'fp16' or 'no'")
    return text


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for CUDA with fp16/bf16, a no-op context otherwise."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_DTYPES[mixed_precision])


def world_size() -> int:
    """Number of processes of a distributed launch (``accelerate launch``/``torchrun`` set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class Runtime:
    """Where and how a training stage computes.

    Attributes:
        device: the compute device (``accelerator.device`` in a distributed launch).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
        accelerator: an ``accelerate.Accelerator`` when ``WORLD_SIZE > 1``, else ``None``.
    """

    device: torch.device
    mixed_precision: str = "no"
    accelerator: object | None = None

    @property
    def distributed(self) -> bool:
        return self.accelerator is not None

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index) if self.accelerator is not None else 0  # type: ignore[attr-defined]

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes) if self.accelerator is not None else 1  # type: ignore[attr-defined]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.mixed_precision)

    def wait(self) -> None:
        """Barrier between the processes of a distributed launch (no-op otherwise)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]

    def any_process(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (one tiny all-reduce when distributed)."""
        if self.accelerator is None:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)  # type: ignore[attr-defined]

    def mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce mean of a tensor (identity when not distributed)."""
        if self.accelerator is None:
            return tensor
        return self.accelerator.reduce(tensor, reduction="mean")  # type: ignore[attr-defined]

    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of scalar values over processes (the dict itself when not distributed)."""
        if self.accelerator is None or not values:
            return values
        packed = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        packed = self.mean_over_processes(packed).cpu().tolist()
        return dict(zip(values, packed, strict=True))

    def local_part(self, global_size: int) -> slice:
        """This process's slice of a global batch of ``global_size`` items (all of it when single)."""
        per = global_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """``accelerator.prepare`` (DDP wrapper, accelerated optimizer) when distributed; unchanged otherwise."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)  # type: ignore[attr-defined]

    def no_sync(self, model: torch.nn.Module | None, skip_sync: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` for the non-final micro-batches of an accumulated step."""
        if self.accelerator is None or model is None or not skip_sync:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)  # type: ignore[attr-defined]

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        """``loss.backward()`` (through ``accelerator.backward`` when distributed, scaled for fp16)."""
        if scaler is not None:
            loss = scaler.scale(loss)
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)  # type: ignore[attr-defined]

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 training, ``None`` otherwise."""
        return torch.amp.GradScaler("cuda") if self.mixed_precision == "fp16" else None


def make_runtime(device: str, mixed_precision: str, owner: str = "StageConfig") -> Runtime:
    """The runtime of a training stage.

    Single process (no ``WORLD_SIZE`` > 1): the parsed ``device``. Under ``accelerate launch``
    with several processes: an ``Accelerator`` (DDP; NCCL on CUDA, gloo with ``device='cpu'``)
    and each process's own device (``cuda:LOCAL_RANK``), whatever GPU index ``device`` names.

    Raises:
        InputError: see :func:`resolve_device` and :func:`check_mixed_precision`.
    """
    parsed = resolve_device(device, f"{owner}.device")
    precision = check_mixed_precision(mixed_precision, parsed, f"{owner}.mixed_precision")
    if world_size() <= 1:
        return Runtime(parsed, precision)
    from accelerate import Accelerator

    # mixed precision is ours (autocast + GradScaler), not accelerate's: pass "no" explicitly so an
    # ``accelerate launch --mixed_precision`` flag cannot change what the config says.
    accelerator = Accelerator(cpu=parsed.type == "cpu", mixed_precision="no")
    return Runtime(accelerator.device, precision, accelerator)
