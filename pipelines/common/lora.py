"""LoRA files for the OmniGen2 transformer: read every common format, report matched and unmatched keys, and
apply them the way ai-toolkit samples previews.

ai-toolkit quirks reproduced here (its ``network_mixins.py``):

- merge (every prompt of the round has the same multiplier and the base is not quantised):
  ``W = dtype(float32(W) + m * (B @ A) * scale)`` in float32, rounded once to the model dtype;
- merge-out after the round adds ``-|m| * (B @ A) * scale`` the same way: rounding twice leaves base weights a
  bf16 step off ("drift"), and a negative ``m`` is added twice and never removed;
- modules whose A or B is all zero are skipped by both (the step-0 round changes nothing);
- unmerged (side branch): ``y = base(x) + dtype(B(A(float32(x))) * scale * m)``, skipped when ``m == 0``;
- scale is ``alpha / rank`` when the file has ``.alpha`` keys; ai-toolkit's own files have none (scale 1).

Two inference-server ways are here too, to measure what they change: OmniGen2's fuse in the model dtype
(``merge_like_server``) and FLUX.1's unfused PEFT adapter in the model dtype (``attach_like_peft``).

Base weights are restored exactly from a snapshot of the pristine tensors, never by subtracting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Known key prefixes, longest first; the module path follows them.
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
# (down, up) suffix pairs of each naming convention.
PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)
ALPHA_SUFFIX = ".alpha"
KOHYA_PREFIX = "lora_unet_"


class LoraError(Exception):
    """A LoRA file that cannot be used (unreadable, pickle, nothing that applies)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class LoraModule:
    """One low-rank pair for the Linear at ``path``: ``delta W = scale * up @ down``."""

    path: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def is_zero(self) -> bool:
        return not self.up.any() or not self.down.any()


@dataclass
class LoraFile:
    """A parsed LoRA file. ``module_paths`` are as named in the file (after prefix stripping)."""

    path: Path
    format: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    dtypes: list[str]
    unparsed_keys: list[str] = field(default_factory=list)
    unpaired_keys: list[str] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)  # key -> NaN/Inf values in that tensor (none: absent)

    @property
    def training_step(self) -> int | None:
        try:
            return int(json.loads(self.metadata.get("training_info", "{}")).get("step"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None


@dataclass
class KeyReport:
    """How a LoRA's modules matched the transformer's Linear layers. Never silent about a miss."""

    matched: list[str]
    unmatched: list[str]
    shape_mismatches: list[str]
    unparsed_keys: list[str]
    unpaired_keys: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.matched) and not (
            self.unmatched or self.shape_mismatches or self.unparsed_keys or self.unpaired_keys
        )

    def problem(self) -> str | None:
        """One line describing what did not apply, or None when everything matched."""
        if self.ok:
            return None
        parts = []
        if not self.matched:
            parts.append("applies to 0 layers")
        for label, names in (
            ("unmatched modules", self.unmatched),
            ("shape mismatches", self.shape_mismatches),
            ("unrecognised keys", self.unparsed_keys),
            ("unpaired keys", self.unpaired_keys),
        ):
            if names:
                shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        return "; ".join(parts)


def _strip_prefix(key: str) -> tuple[str, str]:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def read_lora(path: str | Path, module_names: list[str] | None = None,
              convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> LoraFile:
    """Parse a LoRA safetensors file of any supported format.

    ``module_names`` (the transformer's Linear paths) resolves kohya ``lora_unet_a_b_c`` names, whose dots were
    flattened to underscores; without it kohya keys stay unparsed. ``convert`` is a family's key mapping, applied
    to the file's tensors first (e.g. FLUX.1's original-layout names to diffusers' module paths).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(path, "not a .safetensors file (pickle LoRAs are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:
        raise LoraError(path, f"unreadable safetensors file ({exc})") from None
    if not tensors:
        raise LoraError(path, "contains no tensors")
    if convert is not None:
        tensors = convert(tensors)
    nonfinite = count_nonfinite(tensors)

    kohya = {name.replace(".", "_"): name for name in module_names or []}
    downs, ups, alphas, unparsed = {}, {}, {}, []
    formats = set()
    for key, tensor in tensors.items():
        prefix, rest = _strip_prefix(key)
        module = kind = None
        for down_suffix, up_suffix in PAIR_SUFFIXES:
            for suffix, which in ((down_suffix, "down"), (up_suffix, "up")):
                if rest.endswith(suffix):
                    module, kind = rest[: -len(suffix)], which
                    formats.add(f"{prefix or '(no prefix)'}*{down_suffix.split('.')[-2]}")
        if module is None and rest.endswith(ALPHA_SUFFIX):
            module, kind = rest[: -len(ALPHA_SUFFIX)], "alpha"
        if module is not None and module.startswith(KOHYA_PREFIX):
            flat = module[len(KOHYA_PREFIX) :]
            module = kohya.get(flat, module)
            formats.add("kohya")
        if module is None:
            unparsed.append(key)
            continue
        if kind == "alpha" and tensor.numel() != 1:
            raise LoraError(path, f"{key}: an alpha must be one number, got a tensor of shape {tuple(tensor.shape)}")
        {"down": downs, "up": ups, "alpha": alphas}[kind][module] = tensor

    modules, unpaired = {}, []
    for name in sorted(set(downs) | set(ups)):
        if name not in downs or name not in ups:
            unpaired.append(name + (" (no down/A)" if name not in downs else " (no up/B)"))
            continue
        down, up = downs[name].float(), ups[name].float()
        scale = float(alphas[name].float().item()) / down.shape[0] if name in alphas else 1.0
        modules[name] = LoraModule(name, down, up, scale)
    return LoraFile(
        path=path,
        format=describe_format(formats),
        modules=modules,
        metadata=metadata,
        dtypes=sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        unparsed_keys=unparsed,
        unpaired_keys=unpaired,
        nonfinite=nonfinite,
    )


def count_nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """NaN and infinite values per tensor, for the tensors that have any: one such value in B @ A turns every
    merged weight it touches, and from there the whole image, into NaN (a black replay)."""
    counts = {}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                counts[key] = bad
    return counts


def describe_format(found: set[str]) -> str:
    if "kohya" in found:
        return "kohya"
    if any(f.startswith("diffusion_model.") and f.endswith("lora_A") for f in found):
        return "ai-toolkit"
    if any(f.endswith("lora_A") for f in found):
        return "diffusers/peft"
    if any(f.endswith(("lora_down", "down")) for f in found):
        return "lora_down/lora_up"
    return "unknown"


def linear_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """Every Linear-like module (plain or quantised) of the transformer by dotted path."""
    return {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear) or _is_qlinear(m)}


def _is_qlinear(module: nn.Module) -> bool:
    return type(module).__name__ == "QLinear"


def match_lora(lora: LoraFile, transformer: nn.Module) -> KeyReport:
    targets = linear_modules(transformer)
    matched, unmatched, mismatched = [], [], []
    for name, module in lora.modules.items():
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
            continue
        out_features, in_features = target.weight.shape
        if module.down.shape[1] != in_features or module.up.shape[0] != out_features:
            mismatched.append(
                f"{name} (LoRA {tuple(module.up.shape)}@{tuple(module.down.shape)}, layer {out_features}x{in_features})"
            )
            continue
        matched.append(name)
    return KeyReport(sorted(matched), sorted(unmatched), mismatched, lora.unparsed_keys, lora.unpaired_keys)


class LoraPatcher:
    """Applies LoRAs to a transformer and puts its pristine weights back bit for bit.

    ``merge`` / ``merge_out`` change weights in place as ai-toolkit does; ``attach`` adds an unmerged side
    branch; ``restore`` undoes everything. One base load serves every checkpoint of a run.
    """

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.targets = linear_modules(transformer)
        self._pristine: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    def _weight(self, path: str) -> torch.Tensor:
        module = self.targets[path]
        if _is_qlinear(module):
            raise LoraError(path, "cannot merge into a quantised layer (ai-toolkit runs it unmerged)")
        if path not in self._pristine:
            self._pristine[path] = module.weight.detach().clone()
        return module.weight

    @torch.no_grad()
    def merge(self, lora: LoraFile, multiplier: float) -> int:
        """Merge ``lora`` with ``multiplier`` into the weights; returns how many modules changed."""
        changed = 0
        for name, module in lora.modules.items():
            if name not in self.targets or module.is_zero():
                continue
            weight = self._weight(name)
            up = module.up.to(weight.device)
            down = module.down.to(weight.device)
            merged = weight.float() + multiplier * (up @ down) * module.scale
            weight.copy_(merged.to(weight.dtype))
            changed += 1
        return changed

    @torch.no_grad()
    def merge_like_server(self, lora: LoraFile, multiplier: float) -> int:
        """ai-toolkit-inference's fuse: ``B @ A`` on the CPU in the file's dtype, cast to the model dtype and added
        there with ``m`` (no float32 sum). Used to measure what that departure does to a preview."""
        file_dtype = getattr(torch, lora.dtypes[0]) if len(lora.dtypes) == 1 else torch.float32
        changed = 0
        for name, module in lora.modules.items():
            if name not in self.targets:
                continue
            weight = self._weight(name)
            delta = (module.up.to(file_dtype) @ module.down.to(file_dtype)).to(weight.dtype).to(weight.device)
            weight.add_(multiplier * delta)
            changed += 1
        return changed

    def attach_like_peft(self, lora: LoraFile, multiplier: float) -> int:
        """ai-toolkit-inference's FLUX.1 LoRA: diffusers ``load_lora_weights`` makes it a PEFT adapter that is never
        fused (src/pipelines/base.py ``_load_lora``, SET_ADAPTERS). PEFT casts A and B to the layer's dtype
        (tuners_utils ``_move_adapter_to_device_of_base_layer``) and its ``lora.Linear.forward`` adds
        ``B(A(x)) * scaling`` in that dtype, ``scaling = m * alpha / rank`` (diffusers ``set_adapters`` scale)."""
        count = 0
        for name, module in lora.modules.items():
            target = self.targets.get(name)
            if target is None:
                continue
            hook = target.register_forward_hook(_peft_branch(module, multiplier, target.weight))
            self._hooks.append(hook)
            count += 1
        if count:
            self._hooks_changed()
        return count

    def merge_out(self, lora: LoraFile, multiplier: float) -> int:
        """ai-toolkit's merge-out: merge again with ``-|multiplier|``."""
        return self.merge(lora, -abs(multiplier))

    def replay_merge_history(self, rounds: list[tuple[LoraFile, float]]) -> None:
        """Merge in and out each earlier merged round, leaving the base drifted exactly as ai-toolkit's was."""
        for lora, multiplier in rounds:
            self.merge(lora, multiplier)
            self.merge_out(lora, multiplier)

    def attach(self, lora: LoraFile, multiplier: float) -> int:
        """Run ``lora`` unmerged: a float32 side branch added to each matched layer's output."""
        if multiplier == 0:
            return 0
        count = 0
        for name, module in lora.modules.items():
            target = self.targets.get(name)
            if target is None:
                continue
            hook = target.register_forward_hook(_side_branch(module, multiplier, target.weight.device))
            self._hooks.append(hook)
            count += 1
        if count:
            self._hooks_changed()
        return count

    def _hooks_changed(self) -> None:
        """Captured CUDA graphs do not see forward hooks: tell the transformer they changed (denoise.py)."""
        if hasattr(self.transformer, "hooks_epoch"):
            self.transformer.hooks_epoch += 1

    @torch.no_grad()
    def restore(self) -> None:
        """Remove side branches and copy every touched weight back from its pristine snapshot."""
        if self._hooks:
            self._hooks_changed()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, pristine in self._pristine.items():
            self.targets[name].weight.copy_(pristine)

    def drift(self) -> dict:
        """How far the current weights are from pristine: max abs difference and tensors changed."""
        max_abs, changed = 0.0, 0
        for name, pristine in self._pristine.items():
            delta = (self.targets[name].weight.float() - pristine.float()).abs().max().item()
            if delta > 0:
                changed += 1
                max_abs = max(max_abs, delta)
        return {"max_abs": max_abs, "tensors_changed": changed}


def _side_branch(module: LoraModule, multiplier: float, device: torch.device):
    down = module.down.to(device)
    up = module.up.to(device)
    scale = torch.tensor(module.scale, dtype=torch.float32, device=device)
    factor = torch.tensor((multiplier,), dtype=torch.float32, device=device)

    def hook(layer, inputs, output):
        x = inputs[0]
        if hasattr(x, "dequantize"):
            x = x.dequantize()
        branch = nn.functional.linear(nn.functional.linear(x.to(torch.float32), down), up) * scale
        branch = branch * factor.view(*([1] * branch.dim()))
        return output + branch.to(output.dtype)

    return hook


def _peft_branch(module: LoraModule, multiplier: float, weight: torch.Tensor):
    dtype = weight.dtype  # a quanto weight reports its float dtype
    down = module.down.to(weight.device, dtype)
    up = module.up.to(weight.device, dtype)
    scaling = multiplier * module.scale  # a Python float, as PEFT multiplies by it

    def hook(layer, inputs, output):
        x = inputs[0]
        if hasattr(x, "dequantize"):
            x = x.dequantize()
        return output + nn.functional.linear(nn.functional.linear(x.to(dtype), down), up) * scaling

    return hook


class WeightManager:
    """Puts a transformer in one :class:`pipelines.family.WeightState` after another, the base restored bit for
    bit in between: the state-machine every family's session uses.

    ``read`` parses a LoRA file for this transformer (the family's key mapping). The next merged round after the
    one in place is reached by that round's merge-out (exactly the newest round of the new history: same LoRA,
    same multiplier, same base) and the new merge, instead of a restore and every earlier round again.
    """

    def __init__(self, patcher: LoraPatcher, read: Callable[[Path], LoraFile]):
        self.patcher = patcher
        self.read = read
        self.state = None

    def apply(self, state) -> None:
        """Make ``state`` (a ``WeightState``) the transformer's; nothing to do when it already is."""
        if state == self.state:
            return
        previous, patcher = self.state, self.patcher
        if (previous is not None and previous.mode == "merged" and previous.lora is not None
                and state.mode == "merged" and state.history[:-1] == previous.history
                and state.history[-1:] == ((previous.lora, previous.multiplier),)):
            patcher.merge_out(self.read(previous.lora), previous.multiplier)
        else:
            patcher.restore()
            for path, multiplier in state.history:
                patcher.replay_merge_history([(self.read(path), multiplier)])
        if state.lora is not None:
            lora = self.read(state.lora)
            if state.mode == "server":
                patcher.merge_like_server(lora, state.multiplier)
            elif state.mode == "adapter":
                patcher.attach_like_peft(lora, state.multiplier)
            elif state.mode == "merged":
                patcher.merge(lora, state.multiplier)
            elif state.mode == "hooks":
                patcher.attach(lora, state.multiplier)
            else:
                raise ValueError(f"unknown weight mode {state.mode!r}: merged, hooks, server or adapter")
        self.state = state


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any submodule has forward (pre-)hooks: an unmerged LoRA, a PEFT-like adapter. A compiled graph
    must not run then: dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``), so a graph traced
    before the hooks were added would silently skip them."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
