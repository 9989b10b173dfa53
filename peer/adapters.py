"""LoRA adapters on a peer's blocks: several runs' adapters side by side on one frozen base.

peft injects its LoRA layers into the span's own decoder layers (on bitsandbytes NF4 layers that is QLoRA).
Which adapter a computation uses is chosen just before it runs; every computation runs on the peer's one
runtime thread, so concurrent sessions with different adapters never see each other's choice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from tsotsa.spans import BlockSpan
from tsotsa.training.lora import LoraSettings, adapter_key, initial_lora_a

_STALE = object()  # the layers' active adapter is not known: the next `activate` sets it everywhere


class Adapters:
    def __init__(self, span: BlockSpan) -> None:
        self.span = span
        self.settings: dict[str, LoraSettings] = {}
        self._tensors: dict[str, dict[str, torch.nn.Parameter]] = {}  # adapter -> PEFT key -> parameter
        self._active: str | None | object = _STALE
        self.on_change: Callable[[], None] = lambda: None  # the peer announces its adapters anew
        self._training: set[str] = set()  # adapters whose B matrices train: they always require grad

    def __contains__(self, name: str) -> bool:
        return name in self.settings

    @property
    def names(self) -> list[str]:
        return sorted(self.settings)

    def attach(self, name: str, settings: LoraSettings) -> None:
        """Adds adapter `name` to every target module: A drawn from the run's seed, B zero (PEFT's start)."""
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
            warnings.simplefilter("ignore")
            inject_adapter_in_model(settings.peft_config(), self.span, adapter_name=name)
        tensors: dict[str, torch.nn.Parameter] = {}
        for module_name, module in self.span.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            _, local, path = module_name.split(".", 2)  # layers.<j>.<self_attn.q_proj>
            block = self.span.span.start + int(local)
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            with torch.no_grad():
                a.data = initial_lora_a(settings.seed, adapter_key(block, path, "lora_A"), *a.shape).to(a.device)
                b.data = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            tensors[adapter_key(block, path, "lora_A")] = a
            tensors[adapter_key(block, path, "lora_B")] = b
        self.settings[name], self._tensors[name] = settings, tensors
        self._active = _STALE  # peft activated the new adapter in the layers it touched
        self.activate(None)
        self.on_change()

    def remove(self, name: str) -> None:
        for module in self._lora_layers():
            if name in module.lora_A:
                module.delete_adapter(name)
        self.settings.pop(name, None)
        self._tensors.pop(name, None)
        self._training.discard(name)
        self._active = _STALE
        self.activate(None)
        self.on_change()

    def activate(self, name: str | None) -> None:
        """Makes the next computations use adapter `name` (None: the base model).

        peft's set_adapter freezes every adapter it does not activate; the B matrices of runs in training
        are unfrozen again at once: a micro-batch forwarded before this switch and backwarded after it
        must still put its gradient into them. A stays frozen everywhere."""
        if name == self._active:
            return
        for module in self._lora_layers():
            module.set_adapter([name] if name is not None and name in module.lora_A else [], inference_mode=True)
        for training in self._training:
            for key, parameter in self._tensors[training].items():
                parameter.requires_grad_(key.endswith(".lora_B.weight"))
        self._active = name

    def set_training(self, name: str, training: bool) -> None:
        """Whether the adapter's B matrices train (require grad) whatever adapter is active."""
        if training:
            self._training.add(name)
        else:
            self._training.discard(name)
        self._active = _STALE

    def tensors(self, name: str) -> dict[str, torch.nn.Parameter]:
        """PEFT key -> the live parameter, for every A and B of the adapter."""
        return self._tensors[name]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {key: parameter.detach().to("cpu", copy=True) for key, parameter in self._tensors[name].items()}

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """PEFT key -> shape of every A and B of the adapter: what a new state for it must hold."""
        return {key: tuple(parameter.shape) for key, parameter in self._tensors[name].items()}

    def load(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Replaces every A and B of the adapter; the keys and shapes must be exactly this span's."""
        mine = self._tensors[name]
        check_adapter_keys(mine, state)
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(mine[key].shape):
                raise ValueError(f"{key} has shape {list(tensor.shape)}, expected {list(mine[key].shape)}")
        with torch.no_grad():
            for key, tensor in state.items():
                mine[key].copy_(tensor.to(mine[key].dtype))

    def _lora_layers(self) -> list[LoraLayer]:
        return [module for module in self.span.modules() if isinstance(module, LoraLayer)]


def check_adapter_keys(expected: Iterable[str], given: Iterable[str]) -> None:
    """ValueError unless `given` names exactly the adapter tensors `expected` (this span's): none missing,
    none of another span, module or run. Checked on names alone, before any tensor is decoded."""
    expected, given = set(expected), set(given)
    missing, unknown = sorted(expected - given), sorted(given - expected)
    if missing or unknown:
        raise ValueError(f"adapter tensors do not match this peer's blocks: missing {_names(missing)}, "
                         f"unexpected {_names(unknown)}")


def _names(keys: list[str]) -> list[str]:
    """The first few keys, each cut short: a refusal should not echo a megabyte of garbage."""
    return [key[:160] for key in keys[:3]]
