"""``parity lora``: what a LoRA file holds and whether it applies to its model family's transformer (FACTS §4).

Reads the format, ranks, dtypes, scale convention and ai-toolkit's metadata; matches every module against the
transformer's Linear layers, built on the meta device (no weights) from the base model's transformer config or,
without one, the released model of the LoRA's family; and measures each module's weight change ``||B @ A||_F``.
A LoRA applies when every key matched: "applied to 0 layers" or a partial match is the failure users hit
(FACTS §7), and inference tools skip unmatched keys silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from parity.errors import EnvironmentProblem, InputError
from parity.jobfolder import read_safetensors_header
from parity.safe_io import json_safe, regular_file_problem

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# ai-toolkit's default targets (network.transformer_only): Linear layers whose path contains one of these


@dataclass(frozen=True)
class ModuleNorm:
    """How much one module changes its layer: Frobenius norms of B @ A, A (down) and B (up)."""

    module: str
    rank: int
    scale: float  # alpha / rank, or 1 without .alpha keys
    delta_norm: float  # ||B @ A||_F (times scale it is the weight change at multiplier 1)
    down_norm: float  # ||A||_F
    up_norm: float  # ||B||_F


@dataclass(frozen=True)
class LoraMetadata:
    """What ai-toolkit writes into a LoRA's safetensors metadata; None where absent."""

    training_step: int | None
    epoch: int | None
    base_model_version: str | None  # ss_base_model_version, "omnigen2" for ai-toolkit's OmniGen2 LoRAs
    software: str | None  # the writing tool's name from `software`
    software_version: str | None  # ai-toolkit's version from `software`
    name: str | None  # from the job's meta: section
    version: str | None
    output_name: str | None  # ss_output_name: the job name


@dataclass
class LoraReport:
    """A LoRA file inspected against an OmniGen2 transformer."""

    file: str
    format: str
    tensor_count: int
    module_count: int
    ranks: dict[int, int]  # rank -> number of modules
    dtypes: list[str]
    alpha_keys: int
    scales: list[float]  # distinct alpha / rank values (1.0 without .alpha keys)
    metadata: LoraMetadata
    raw_metadata: dict[str, str]
    checked_against: str
    layer_count: int  # Linear layers of that transformer
    default_target_count: int  # of which ai-toolkit targets by default
    matched: list[str]
    unmatched: list[str]
    shape_mismatches: list[str]
    unparsed_keys: list[str]
    unpaired_keys: list[str]
    norms: list[ModuleNorm]  # largest ||B @ A|| first
    untrained: bool  # every B is zero: the LoRA changes nothing
    notes: list[str] = field(default_factory=list)
    family: str = "OmniGen2"  # the model family it was checked against
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor key -> NaN/Inf values in it

    @property
    def scale_convention(self) -> str:
        if not self.alpha_keys:
            return "1 (no .alpha keys: ai-toolkit forces alpha = rank)"
        return "alpha/rank = " + ", ".join(f"{s:g}" for s in self.scales)

    @property
    def applies(self) -> bool:
        """Every key of the file became a module that matched a layer of the right shape, and every value is a
        finite number (one NaN makes every image it touches NaN: black)."""
        return bool(self.matched) and not (
            self.unmatched or self.shape_mismatches or self.unparsed_keys or self.unpaired_keys or self.nonfinite
        )

    @property
    def problem(self) -> str | None:
        """One line saying what does not apply, or None."""
        if self.applies:
            return None
        keys_off = self.unmatched or self.shape_mismatches or self.unparsed_keys or self.unpaired_keys
        parts = (
            ["applies to 0 layers"]
            if not self.matched
            else [f"applies to {len(self.matched)} of {self.module_count} modules"] if keys_off else []
        )
        for label, names in (
            ("unmatched modules", self.unmatched),
            ("shape mismatches", self.shape_mismatches),
            ("unrecognised keys", self.unparsed_keys),
            ("unpaired keys", self.unpaired_keys),
        ):
            if names:
                parts.append(f"{len(names)} {label}")
        if self.nonfinite:
            parts.append(nonfinite_text(self.nonfinite))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN and infinite norms or scales (from such tensors) become null."""
        data = asdict(self)
        data["ranks"] = {str(k): v for k, v in self.ranks.items()}
        data["scale_convention"] = self.scale_convention
        data["applies"] = self.applies
        data["problem"] = self.problem
        return json_safe(data)


def nonfinite_text(nonfinite: dict[str, int]) -> str:
    """``{key: count}`` of NaN/Inf values in words, e.g. "2 tensors hold NaN/Inf values (5 values)"."""
    tensors = f"{len(nonfinite)} tensor{'s' if len(nonfinite) != 1 else ''}"
    return f"{tensors} hold{'s' if len(nonfinite) == 1 else ''} NaN/Inf values ({sum(nonfinite.values())} in all)"


def inspect_lora(path: str | Path, base_model: str | Path | None = None) -> LoraReport:
    """Read ``path`` and match it against ``base_model``'s transformer, or against the released model of the family
    the LoRA was trained for (its ``ss_base_model_version``, else its module names).

    Raises InputError for a file that is missing, not safetensors, a pickle or corrupt, or a base model folder
    that no family reads; EnvironmentProblem for a base model that is not on this machine.
    """
    path = Path(path)
    header = _check_file(path)  # a file that is no LoRA is refused before torch is imported
    from pipelines.common.lora import linear_modules

    family, skeleton = lora_family(header, base_model)
    lora, keys = match_against(path, skeleton, family.lora_convert)
    layers = linear_modules(skeleton[0])
    tensors = [k for k in header if k != "__metadata__"]
    alpha_keys = sum(k.endswith(".alpha") for k in tensors)
    norms = sorted((_norms(m) for m in lora.modules.values()), key=lambda n: -n.delta_norm)
    ranks: dict[int, int] = {}
    for module in lora.modules.values():
        ranks[module.rank] = ranks.get(module.rank, 0) + 1
    metadata = read_metadata(lora.metadata)
    report = LoraReport(
        file=str(path),
        format=lora.format,
        tensor_count=len(tensors),
        module_count=len(lora.modules),
        ranks=dict(sorted(ranks.items())),
        dtypes=lora.dtypes,
        alpha_keys=alpha_keys,
        scales=sorted({m.scale for m in lora.modules.values()}),
        metadata=metadata,
        raw_metadata=dict(lora.metadata),
        checked_against=skeleton[1],
        layer_count=len(layers),
        default_target_count=sum(any(p in name for p in family.lora_target_parts) for name in layers),
        matched=keys.matched,
        unmatched=keys.unmatched,
        shape_mismatches=keys.shape_mismatches,
        unparsed_keys=keys.unparsed_keys,
        unpaired_keys=keys.unpaired_keys,
        norms=norms,
        untrained=bool(lora.modules) and all(not m.up.any() for m in lora.modules.values()),
        family=family.label,
        nonfinite=dict(lora.nonfinite),
    )
    report.notes.extend(_notes(report, family))
    return report


def base_model_dir(base_model: str | Path) -> Path:
    """A base model folder (or Hugging Face id in the local cache), or one line: EnvironmentProblem when it is not
    on this machine, InputError when it is not a folder."""
    from pipelines.common.files import resolve_model_dir
    from pipelines.family import ModelDirError

    try:
        return resolve_model_dir(base_model)
    except ModelDirError as exc:
        if exc.missing:
            raise EnvironmentProblem(exc.path, "base model not found") from None
        raise InputError(exc.path, exc.problem) from None


def lora_family(header: dict[str, Any], base_model: str | Path | None):
    """(family, meta-device skeleton) a LoRA is checked against: the family whose transformer config
    ``base_model`` has, else the one its metadata names, else the one whose module names it uses most."""
    from pipelines.family import ModelDirError
    from pipelines.registry import families

    every = [f for f in families() if f.skeleton is not None]
    if base_model is not None:
        root = base_model_dir(base_model)
        problems = []
        for family in every:
            try:
                return family, family.skeleton(root)
            except ModelDirError as exc:
                problems.append(f"{family.label}: {exc.path}: {exc.problem}")
        raise InputError(root, "no model family reads this folder (" + "; ".join(problems) + ")")
    version = ((header.get("__metadata__") or {}).get("ss_base_model_version") or "").lower()
    keys = [k for k in header if k != "__metadata__"]
    hits = {f.name: sum(any(h in k for h in f.lora_key_hints) for k in keys) for f in every}
    family = next((f for f in every if version and version in f.lora_base_versions), None)
    family = family or max(every, key=lambda f: (hits[f.name], -every.index(f)))
    return family, transformer_skeleton(family, None)


def _check_file(path: Path) -> dict[str, Any]:
    """The file's safetensors header; InputError with one line for anything that is not a LoRA file."""
    if not path.exists():
        raise InputError(path, "LoRA file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a LoRA file")
    if (problem := regular_file_problem(path)) is not None:
        raise InputError(path, f"not a LoRA file: {problem}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(path, "pickle file: parity never loads pickles (convert the LoRA to .safetensors)")
    if path.suffix.lower() != ".safetensors":
        raise InputError(path, "not a .safetensors file")
    return read_safetensors_header(path)


def match_against(path: str | Path, skeleton, convert=None):
    """(LoraFile, KeyReport) of ``path`` against a :func:`transformer_skeleton`; InputError if unreadable."""
    from pipelines.common.lora import LoraError, linear_modules, match_lora, read_lora

    transformer, _ = skeleton
    try:
        lora = read_lora(path, list(linear_modules(transformer)), convert=convert)
    except LoraError as exc:
        raise InputError(exc.path, exc.problem) from None
    for module in lora.modules.values():
        if module.down.dim() != 2 or module.up.dim() != 2 or module.up.shape[1] != module.down.shape[0]:
            raise InputError(
                path,
                f"{module.path}: not a low-rank pair (down {tuple(module.down.shape)}, up {tuple(module.up.shape)})",
            )
    return lora, match_lora(lora, transformer)


def transformer_skeleton(family, root: Path | None):
    """(the family's transformer on the meta device, what it was built from): only its config is read."""
    from pipelines.family import ModelDirError

    try:
        return family.skeleton(root)
    except ModelDirError as exc:
        raise InputError(exc.path, exc.problem) from None


def read_metadata(metadata: dict[str, str]) -> LoraMetadata:
    """ai-toolkit's metadata fields (FACTS §4); JSON fields that do not parse count as absent."""
    info = _json(metadata.get("training_info"))
    software = _json(metadata.get("software"))
    return LoraMetadata(
        training_step=info.get("step") if isinstance(info.get("step"), int) else None,
        epoch=info.get("epoch") if isinstance(info.get("epoch"), int) else None,
        base_model_version=metadata.get("ss_base_model_version"),
        software=_text(software.get("name")),
        software_version=_text(software.get("version")),
        name=metadata.get("name"),
        version=metadata.get("version"),
        output_name=metadata.get("ss_output_name"),
    )


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _norms(module) -> ModuleNorm:
    import numpy as np

    down, up = module.down.double().numpy(), module.up.double().numpy()
    # ||B A||_F^2 = sum((B^T B) * (A A^T)): two rank x rank Gram matrices instead of the full out x in product
    delta = float(np.sqrt(max(((up.T @ up) * (down @ down.T)).sum(), 0.0)))
    return ModuleNorm(
        module.path, module.rank, module.scale, delta, float(np.linalg.norm(down)), float(np.linalg.norm(up))
    )


def _notes(report: LoraReport, family) -> list[str]:
    notes = []
    if report.untrained:
        notes.append("every B (up) matrix is zero: the LoRA is untrained and changes nothing")
    version = report.metadata.base_model_version
    if version is not None and version.lower() not in family.lora_base_versions:
        notes.append(f"ss_base_model_version is {version!r}: trained for another model than {family.label}")
    if report.alpha_keys and any(s != 1.0 for s in report.scales):
        notes.append("scale alpha/rank is not 1: ai-toolkit-inference ignores alpha and fuses B @ A unscaled")
    if report.format not in ("ai-toolkit",):
        notes.append(f"{report.format} naming: module names were mapped from the file's own convention")
    return notes
