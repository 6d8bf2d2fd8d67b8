"""Replay a plan's previews through the reference OmniGen2 pipeline: one base load per run.

For every preview the ``Replayer`` puts the transformer in the state ai-toolkit sampled it in: the base weights
drifted by the merge/un-merge cycles of earlier merged rounds (when their weights exist), then the round's LoRA
merged (same multiplier across the round) or attached as a float32 side branch. It predicts the residual that
the files cannot remove (a LoRA rounded to float16, an earlier checkpoint deleted) and says so per preview.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity import __version__
from parity.errors import EnvironmentProblem, InputError
from parity.plan import ReplayItem, ReplayPlan

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32"}
# Distinct CPU draw algorithms worth trying when choosing automatically (2.11's two paths draw bf16 alike).
NOISE_CANDIDATES = ("torch2.11-avx512", "torch2.11-scalar", "torch2.13-avx2", "torch2.13-scalar")
# A candidate draw scoring below this on a step-0 preview made another picture (a wrong draw scores ~0.07), so a
# candidate at the DRIFT threshold or above while every other stays below it is chosen from one preview.
CLEARLY_UNRELATED_SSIM = 0.5
# Draws differing in at most this share of values are "nearly the same" (torch 2.13's vector and scalar bf16 paths:
# ~1 in 10k): they make the same picture, so the first preview decides between them as well as a second would.
NEAR_DRAW_SHARE = 0.01


@dataclass
class ReplayOptions:
    """How to replay. Defaults reproduce the previews; every field is a named knob."""

    base_model: str | None = None  # overrides the config's model.name_or_path (a training-machine path)
    device: str = "cpu"
    dtype: str | None = None  # default: the job's train.dtype
    noise_algorithm: str = "auto"  # a pipelines.omnigen2.noise name, "native", or "auto" (from step-0 previews)
    lora_overrides: dict[int, Path] = field(default_factory=dict)  # step -> LoRA file used instead
    reproduce_drift: bool = True  # replay earlier merge/un-merge rounds onto the base
    kernel_profile: str = "auto"  # a pipelines.omnigen2.kernels spec, or "auto" (from step-0 previews on CUDA)
    kernel_search: int = 6  # most kernel profiles tried by the automatic choice
    # --fast: batched CFG, maskless attention, float32 rotary, torch.compile on CUDA: last bits may differ
    fast: bool = False
    cuda_graphs: bool = True  # capture each denoising step as a CUDA graph (same kernels, same bits)
    compile: bool | None = None  # torch.compile the --fast blocks (default: with --fast on CUDA)


@dataclass(frozen=True)
class Knobs:
    """Replay choices beyond the plan item's own values. The defaults are ai-toolkit's preview behaviour; each
    field is a named knob that diagnosis flips one at a time (item values such as seed or steps are flipped by
    replacing fields of the ReplayItem instead)."""

    prompt_template_passes: int = 2  # ai-toolkit templates the prompt twice
    negative_template_passes: int = 2  # ... and the negative twice
    empty_negative_template_passes: int | None = None  # ai-toolkit-inference templates an empty negative once
    te_quantized: bool | None = None  # None: as the job did (model.quantize_te)
    lora: bool = True  # False: the base model alone
    merge_mode: str = "aitoolkit"  # "aitoolkit": fp32 sum; "server": file-dtype B@A added in bf16, always merged
    output_size: str = "requested"  # "generation": return the floor-16 image, not resized back (servers)

    def changed(self) -> dict:
        """The knobs that differ from ai-toolkit's defaults."""
        default = Knobs()
        return {k: v for k, v in self.__dict__.items() if getattr(default, k) != v}


@dataclass
class Replay:
    """One finished replay."""

    pixels: np.ndarray
    key: str  # hash of everything that determines the pixels
    weights: str  # what the transformer ran with, in words
    residuals: list[str]  # known sources of difference that the files cannot remove
    lora_problem: str | None = None  # unmatched LoRA keys, named
    pending: object | None = None  # deferred replays: PendingPixels (pixels is None until ``wait``)
    cached: bool = False  # the pixels came from the replay cache (replay_or_cached), not from a replay

    def wait(self) -> np.ndarray:
        """The pixels, waiting for a deferred replay's decode and copy if needed."""
        if self.pixels is None:
            self.pixels = self.pending.result()
            self.pending = None
        return self.pixels


def torch_dtype_name(name: str) -> str:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InputError(None, f"unknown dtype {name!r}; use bf16, fp16 or fp32") from None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Replayer:
    """Loads the base model once and replays plan items in any order."""

    def __init__(self, plan: ReplayPlan, options: ReplayOptions):
        self.plan = plan
        self.options = options
        self.job_dir = Path(plan.job_dir)
        self.dtype_name = torch_dtype_name(options.dtype or plan.train_dtype)
        self.noise_algorithm = options.noise_algorithm
        self.noise_reason = "given with --noise"
        self.kernel_reason = "given with --kernels"
        self.kernel_trials: list[dict] = []  # each kernel profile tried by choose_kernels, against its probe
        self._pipe = None
        self._patcher = None
        self._loras: dict[Path, object] = {}
        self._digests: dict[Path, str] = {}
        self._state: tuple | None = None
        self._base_fingerprint: str | None = None
        self._mllm_variants: dict[bool, object] | None = None
        self.load_timings: dict[str, float] = {}  # seconds per part of the base load (pipelines' Components)

    # -- loading -------------------------------------------------------------------------------------------
    def base_model_path(self) -> str:
        base = self.options.base_model or self.plan.extras_model or self.plan.base_model
        if not base:
            raise InputError(self.plan.config_file, "model.name_or_path is not set; pass --base-model")
        return base

    def load(self) -> None:
        """Load the base model (once). Raises EnvironmentProblem/InputError with one clear line."""
        if self._pipe is not None:
            return
        import torch

        from pipelines.omnigen2 import kernels
        from pipelines.omnigen2.loading import ModelLoadError, load_components, resolve_model_dir
        from pipelines.omnigen2.lora import LoraPatcher
        from pipelines.omnigen2.pipeline import OmniGen2Pipeline

        if self.options.device.startswith("cuda") and not torch.cuda.is_available():
            raise EnvironmentProblem(None, "CUDA was asked for (--device cuda) but torch sees no CUDA device")
        try:  # "auto" starts from the likeliest kernels (the noise choice runs on them) until choose_kernels
            kernels.set_kernel_profile(self.first_kernel_profile())
        except ValueError as exc:
            raise InputError(None, f"--kernels: {exc}") from None
        except RuntimeError as exc:
            raise EnvironmentProblem(None, str(exc)) from None
        base = self.base_model_path()
        try:
            root = resolve_model_dir(base)
            components = load_components(root, getattr(torch, self.dtype_name), self.options.device)
        except ModelLoadError as exc:
            hint = "" if self.options.base_model else " (the config's path; pass --base-model PATH|ID)"
            if exc.missing:
                raise EnvironmentProblem(exc.path, f"base model not found{hint}") from None
            raise InputError(exc.path, exc.problem) from None
        if self.plan.quantize_te:
            quantize_module(components.mllm, self.plan.qtype_te, "text encoder")
        if self.plan.quantize:
            quantize_module(components.transformer, self.plan.qtype, "transformer")
        on_cuda = torch.device(self.options.device).type == "cuda"
        graphs = self.options.cuda_graphs and on_cuda and not self.plan.quantize  # quanto layers: not captured
        self._pipe = OmniGen2Pipeline(components, fast=self.options.fast, cuda_graphs=graphs)
        compile_fast = self.options.compile if self.options.compile is not None else on_cuda
        components.transformer.compile_fast = bool(self.options.fast and compile_fast)
        self._patcher = LoraPatcher(components.transformer)
        self._base_fingerprint = model_fingerprint(root)
        self.load_timings = dict(components.timings)

    def first_kernel_profile(self) -> str:
        """The profile asked for, or with ``auto`` the likeliest: ai-toolkit's default GPU path where its Triton
        kernel can run (CUDA, triton importable, not --fast), else PyTorch's kernels."""
        import torch

        from pipelines.omnigen2 import kernels, triton_norm

        if self.options.kernel_profile != "auto":
            return self.options.kernel_profile
        if torch.device(self.options.device).type != "cuda" or self.options.fast or triton_norm.available():
            return "torch"
        return kernels.format_profile("triton")

    @property
    def pipeline(self):
        self.load()
        return self._pipe

    # -- weights -------------------------------------------------------------------------------------------
    def lora_path(self, step: int, checkpoint: str | None) -> Path | None:
        if step in self.options.lora_overrides:
            return Path(self.options.lora_overrides[step])
        if checkpoint:
            return self.job_dir / checkpoint
        return None

    def read_lora(self, path: Path):
        from pipelines.omnigen2.lora import LoraError, read_lora

        if path not in self._loras:
            if not path.is_file():
                raise InputError(path, "LoRA file not found")
            try:
                self._loras[path] = read_lora(path, list(self._patcher.targets))
            except LoraError as exc:
                raise InputError(exc.path, exc.problem) from None
            self._digests[path] = file_digest(path)
        return self._loras[path]

    def merge_history(self, item: ReplayItem) -> tuple[list[tuple[Path, float]], list[str]]:
        """Earlier merged rounds whose merge/un-merge drifted the base before ``item``'s round."""
        history, missing = [], []
        rounds: dict[tuple[int, str], list[ReplayItem]] = {}
        for other in self.plan.items:
            if other.step < item.step and other.lora_merged and other.weights != "base":
                rounds.setdefault((other.step, other.round), []).append(other)
        for (step, _), members in sorted(rounds.items()):
            path = self.lora_path(step, members[0].checkpoint)
            if path is None or not path.is_file():
                missing.append(step)
                continue
            history.append((path, float(members[0].network_multiplier or 1.0)))
        return history, missing

    def _apply(self, item: ReplayItem, knobs: Knobs) -> tuple[str, list[str], str | None, list]:
        """Put the transformer in ``item``'s state; returns (weights text, residuals, lora problem, key parts)."""
        from pipelines.omnigen2.lora import match_lora

        self.load()
        patcher = self._patcher
        use_lora = item.weights != "base" and knobs.lora
        path = self.lora_path(item.step, item.checkpoint) if use_lora else None
        multiplier = float(item.network_multiplier if item.network_multiplier is not None else 1.0)
        server = knobs.merge_mode == "server"
        merged = (bool(item.lora_merged) and not self.plan.quantize) or server
        history, missing = ([], [])
        if path is not None and merged and self.options.reproduce_drift:
            history, missing = self.merge_history(item)
        if server:
            history, missing = [], []
        state = (str(path), merged, multiplier, tuple(history), knobs.merge_mode)
        residuals: list[str] = []
        problem = None
        if path is None:
            weights = "base model (step 0: the LoRA was still zero)" if item.step == 0 else "base model"
        else:
            lora = self.read_lora(path)
            report = match_lora(lora, self.pipeline.c.transformer)
            problem = report.problem()
            mode = f"merged x{multiplier:g}" if merged else f"unmerged side branch x{multiplier:g}"
            source = "override" if item.step in self.options.lora_overrides else "checkpoint"
            weights = f"{path.name} ({source}, {mode}, {len(report.matched)} layers)"
            if source == "checkpoint" and any(d in ("float16", "bfloat16") for d in lora.dtypes):
                residuals.append(f"fp16-rounded LoRA: {path.name} is the fp32 LoRA rounded to {'/'.join(lora.dtypes)}")
            if history:
                weights += f", base drifted by {len(history)} earlier merge round(s)"
            if missing:
                residuals.append(
                    "merge drift not reproduced: checkpoint of earlier merged step(s) "
                    f"{', '.join(map(str, missing))} missing"
                )
            rounded = [p.name for p, _ in history if p.parent == self.job_dir and "float16" in self.read_lora(p).dtypes]
            if rounded:
                residuals.append(f"merge drift replayed from float16 checkpoints ({', '.join(rounded)}), not the fp32 weights")
        if state != self._state:
            previous = self._state
            if (previous is not None and previous[1] and previous[4] == "aitoolkit" and not server and merged
                    and previous[0] != "None" and history[:-1] == list(previous[3])
                    and history[-1:] == [(Path(previous[0]), previous[2])]):
                # The next merged round after the one in place: its merge-out is exactly the newest round of
                # this history (same LoRA, same multiplier, same base), so only that and the new merge remain
                # instead of a restore and every earlier round again.
                patcher.merge_out(self.read_lora(Path(previous[0])), previous[2])
            else:
                patcher.restore()
                for hpath, hm in history:
                    patcher.replay_merge_history([(self.read_lora(hpath), hm)])
            if path is not None:
                lora = self.read_lora(path)
                if server:
                    patcher.merge_like_server(lora, multiplier)
                elif merged:
                    patcher.merge(lora, multiplier)
                else:
                    patcher.attach(lora, multiplier)
            self._state = state
        key_parts = [
            self._digests.get(path) if path else None,
            merged,
            multiplier,
            [(self._digests[p], m) for p, m in history],
            knobs.merge_mode,
        ]
        return weights, residuals, problem, key_parts

    # -- noise ---------------------------------------------------------------------------------------------
    def choose_noise_algorithm(
        self,
        score_fn,
        max_previews: int = 2,
        part: tuple[int, int] = (0, 1),
        gather=None,
        on_replay=None,
        clear_ssim: float = 0.90,
        unrelated_ssim: float = CLEARLY_UNRELATED_SSIM,
        lookup=None,
    ) -> tuple[str, str]:
        """Pick the CPU draw algorithm that reproduces the step-0 (base-only) previews best.

        ``score_fn(item, pixels)`` is ``parity.scores.score_replay``'s Score (or just an SSIM). The likeliest
        candidate (this torch's own draw; with several ranks, one candidate each) replays the first step-0 preview
        first: a replay identical to the preview (EXACT) decides it at once, since no other draw gives the same
        pixels. Otherwise in two stages: every distinct candidate replays the first step-0 preview; when the best
        reaches ``clear_ssim`` (pass the DRIFT threshold: the same picture) and every other stays below
        ``unrelated_ssim`` (a wrong draw gives an unrelated picture, SSIM about 0.07), that decides it. A
        candidate whose draw is nearly the best's (a few values in 10k apart) makes the same picture, so it
        scores high too without making the choice unclear; the better of the two on that preview wins.
        Otherwise every candidate replays the other probes too and the best mean SSIM wins.

        Several processes share the work: ``part = (rank, world)`` replays every ``world``-th (candidate, probe)
        pair of a stage and ``gather`` (a dict of scores -> the merged dict of every rank) joins them; every rank
        then decides the same. Where a stage leaves a rank idle, it takes a pair of the next stage in advance
        (free: the others are still replaying; its replay is reused if that candidate wins).
        ``on_replay(item, algorithm, replay)`` sees each probe replay (to cache it: the winner's are reused);
        ``lookup(item, key)`` gives a probe's pixels from the replay cache, if there (no replay then).
        """
        from pipelines.omnigen2 import noise

        if self.noise_algorithm != "auto":
            return self.noise_algorithm, self.noise_reason
        probes = [i for i in self.plan.items if i.step == 0 and i.replayable and i.weights == "base"]
        probes = probes[:max_previews]
        native = str(noise.detect_native_algorithm(probe=False))
        if not probes:
            self.noise_algorithm = native
            self.noise_reason = "no step-0 preview to choose from: this torch's own draw"
            return self.noise_algorithm, self.noise_reason
        names: list[str] = []
        draws: dict[str, np.ndarray] = {}
        for name in NOISE_CANDIDATES:
            draw = self._noise_for(probes[0], name).float().numpy().ravel()
            if not any(np.array_equal(draw, other) for other in draws.values()):  # identical: same algorithm here
                draws[name] = draw
                names.append(name)

        def differing(a: str, b: str) -> int:
            return int(np.count_nonzero(draws[a] != draws[b]))

        def near(a: str, b: str) -> bool:
            """Nearly the same draw (torch 2.13's vector and scalar bf16 paths differ in ~1 value in 10k): the
            same picture but for a detail, never told apart as clearly as an unrelated draw."""
            return differing(a, b) <= NEAR_DRAW_SHARE * draws[a].size

        rank, world = part
        # this torch's own draw first: the likeliest to reproduce the previews (and to be reused when a replay is
        # taken in advance)
        likely = sorted(names, key=lambda n: n != native)
        first = [(name, 0) for name in likely]
        rest = [(name, index) for index in range(1, len(probes)) for name in likely]
        screen, first = first[:world], first[world:]
        ahead = -len(first) % world  # idle slots of the first preview's stage
        stages = [screen, first + rest[:ahead], rest[ahead:]]
        found: dict[tuple[str, int], tuple[float, bool]] = {}  # (SSIM, EXACT) per (candidate, probe)
        used = 1
        identical = None

        def scored(item: ReplayItem, name: str, replay: Replay) -> tuple[float, bool]:
            return ssim_and_exact(probe_score(item, name, replay, score_fn, on_replay))

        # On a GPU each probe replay is queued and scored (and cached) on a worker thread while the next one
        # runs; on the CPU the replays use every core, so the scoring waits its turn.
        on_gpu = self.options.device.startswith("cuda")
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-probe") as worker:
            for stage, units in enumerate(stages):
                queued = []
                for name, index in units[rank::world]:  # this process's share of the stage's replays
                    replay = self.replay_or_cached(probes[index], name, lookup, deferred=on_gpu)
                    if on_gpu:
                        queued.append(((name, index), worker.submit(scored, probes[index], name, replay)))
                    else:
                        found[(name, index)] = scored(probes[index], name, replay)
                for unit, future in queued:
                    found[unit] = future.result()
                if gather is not None:
                    found = gather(found)
                if stage == 0:
                    # a draw whose replay is identical to the preview is the one: no other gives the same pixels
                    identical = next((n for n in likely if found.get((n, 0), (0.0, False))[1]), None)
                    if identical:
                        break
                elif stage == 1:
                    top = max(names, key=lambda n: (found[(n, 0)][0], -names.index(n)))
                    others = [found[(n, 0)][0] for n in names if not near(n, top)]
                    if found[(top, 0)][0] >= clear_ssim and all(s < unrelated_ssim for s in others):
                        break  # a second preview would tell apart no more than the first already did
                    used = len(probes)
        if identical:
            self.noise_algorithm = identical
            # (the draws other ranks screened beside it are left out: the report is the same on any number of ranks)
            self.noise_reason = ("chosen from 1 step-0 preview: its replay is identical to the preview (EXACT), "
                                 "so no other draw was needed")
            return self.noise_algorithm, self.noise_reason
        scores = {name: float(np.mean([found[(name, index)][0] for index in range(used)])) for name in names}
        ranked = sorted(names, key=lambda n: (-scores[n], names.index(n)))
        best = ranked[0]
        self.noise_algorithm = best
        runner = ""
        for other in ranked[1:3]:  # the runner-up; after a nearly-same draw, the best unrelated one too
            runner += f"; {'next' if not runner else 'then'} {other} {scores[other]:.3f}"
            if not near(other, best):
                break
            runner += f" (nearly the same draw: {differing(other, best)} of {draws[best].size} values differ)"
        if used == 1:
            clear = " (clear at once, so no second was replayed)" if len(probes) > 1 else ""
            self.noise_reason = f"chosen from 1 step-0 preview{clear}: SSIM {scores[best]:.3f}{runner}"
        else:
            self.noise_reason = f"chosen from {used} step-0 previews: mean SSIM {scores[best]:.3f}{runner}"
        return self.noise_algorithm, self.noise_reason

    def step0_probes(self) -> list[ReplayItem]:
        """Previews of the base model alone (step 0): only noise and kernels set their pixels."""
        return [i for i in self.plan.items if i.step == 0 and i.replayable and i.weights == "base"]

    def block_norm_widths(self) -> list[int]:
        """Row widths of the norms that go through ``kernels.rms_norm`` (the ones a kernel profile changes)."""
        from pipelines.omnigen2.transformer import RMSNorm

        modules = self.pipeline.c.transformer.modules()
        return sorted({int(m.weight.shape[0]) for m in modules if isinstance(m, RMSNorm)})

    def choose_kernels(
        self, score_fn, part: tuple[int, int] = (0, 1), gather=None, on_replay=None, lookup=None,
        max_probes: int | None = None,
    ) -> tuple[str, str]:
        """With ``--kernels auto``: the kernel profile that reproduces a step-0 preview bit for bit.

        On a CPU that is PyTorch's (ai-toolkit runs Triton and flash-attn on CUDA only). On CUDA with Triton,
        ai-toolkit normalised with an autotuned Triton kernel whose warp counts no file records, so the candidates
        (``kernels.kernel_candidates``) are replayed on the first step-0 preview, likeliest first, and the first
        EXACT one wins; ``score_fn(item, pixels)`` is ``parity.scores.score_replay``'s Score. Ranks share the
        candidates (``part``, ``gather`` as in ``choose_noise_algorithm``): each replays its own on the first
        preview (unless the likeliest one's is in every rank's cache: then that one is checked alone first, for
        free), and a candidate identical there is checked on the others by every rank, each replaying its share
        (the replays of the run itself when it is the one). One process tries them in the same order and stops
        where it would have. What each candidate gave is kept in ``kernel_trials`` for the report: the measured
        drift of the kernel choice. ``lookup(item, key)`` gives a probe's pixels from the replay cache if there
        (the noise choice replayed the first one with the likeliest kernels already). ``max_probes``: check only
        the first so many step-0 previews (a run that does not check the step-0 previews themselves: replaying
        them all would be work for the choice alone).
        """
        import torch

        from pipelines.omnigen2 import kernels, triton_norm

        self.load()
        if self.options.kernel_profile != "auto":
            return kernels.kernel_profile(), self.kernel_reason
        if torch.device(self.options.device).type != "cuda":
            self.kernel_reason = "CPU replay: PyTorch's kernels, the ones ai-toolkit uses on a CPU"
            return kernels.kernel_profile(), self.kernel_reason
        if problem := triton_norm.available():
            self.kernel_reason = f"PyTorch's kernels: {problem} (ai-toolkit falls back to them too)"
            return kernels.kernel_profile(), self.kernel_reason
        if self.options.fast:
            self.kernel_reason = "--fast: PyTorch's kernels (its last bits differ from any trainer's anyway)"
            return kernels.kernel_profile(), self.kernel_reason
        every_probe = self.step0_probes()
        probes = every_probe[:max_probes] if max_probes else every_probe
        candidates = kernels.kernel_candidates(self.block_norm_widths(), self.options.kernel_search)
        if not probes:
            kernels.set_kernel_profile(candidates[0])
            self.kernel_reason = "no step-0 preview to choose from: ai-toolkit's default GPU path"
            return kernels.kernel_profile(), self.kernel_reason
        rank, world = part
        found: dict[str, dict] = {}
        chosen = None
        batches = [candidates[i : i + world] for i in range(0, len(candidates), world)]
        if world > 1 and lookup is not None:
            # The likeliest set's first replay is in the cache on every rank (the noise choice ran with it): then
            # it is checked there for free first, and no rank spends a replay screening a less likely set.
            kernels.set_kernel_profile(candidates[0])
            have = self.prepare(probes[0])[0]
            have = lookup(probes[0], have) is not None
            if all((gather({rank: have}) if gather is not None else {rank: have}).values()):
                batches = [candidates[:1]] + [candidates[i : i + world] for i in range(1, len(candidates), world)]
        for batch in batches:
            mine = {}
            if rank < len(batch):  # this rank's candidate, on the first preview
                kernels.set_kernel_profile(batch[rank])
                mine[batch[rank]] = self._kernel_trial(batch[rank], probes[:1], score_fn, on_replay, lookup)
            found.update(gather(mine) if gather is not None else mine)
            for spec in batch:  # in order, the ones identical there: on the other previews, shared by the ranks
                if not found[spec]["identical"]:
                    continue
                kernels.set_kernel_profile(spec)
                share = self._kernel_trial(spec, probes[1:][rank::world], score_fn, on_replay, lookup)
                shares = gather({rank: share}) if gather is not None else {rank: share}
                found[spec] = merged_trial(found[spec], [shares[r] for r in sorted(shares)], len(probes))
                if found[spec]["identical"]:
                    chosen = spec
                    break
            if chosen:
                break
        self.kernel_trials = [found[spec] for spec in candidates if spec in found]
        tried = len(self.kernel_trials)
        sets = f"{tried} kernel set{'s' if tried > 1 else ''} tried"
        if chosen:
            if len(probes) < len(every_probe):
                self.kernel_reason = (f"reproduces the first {len(probes)} of {len(every_probe)} step-0 previews bit "
                                      f"for bit ({sets}; the others are not checked in this run)")
            else:
                self.kernel_reason = f"reproduces all {len(probes)} step-0 preview(s) bit for bit ({sets})"
        else:
            best = max(self.kernel_trials, key=lambda t: t["probes_identical"])
            ssims = [t["ssim"] for t in self.kernel_trials]
            if best["probes_identical"]:
                chosen = best["kernels"]
                self.kernel_reason = (f"closest: reproduces {best['probes_identical']} of {best['probes_tried']} "
                                      f"step-0 preview(s) tried bit for bit ({sets})")
            else:
                chosen = candidates[0]
                self.kernel_reason = (
                    f"no kernel set reproduced a step-0 preview exactly (SSIM {min(ssims):.4f}-{max(ssims):.4f}, "
                    f"{sets}): kept ai-toolkit's default GPU path; the previews were made on another kind of "
                    "machine or Triton version"
                )
        kernels.set_kernel_profile(chosen)
        return kernels.kernel_profile(), self.kernel_reason

    def _kernel_trial(self, spec: str, probes: list[ReplayItem], score_fn, on_replay, lookup=None) -> dict:
        """Replay the step-0 previews with the active kernels until one differs (a wrong set costs one replay; the
        right one's replays are the run's own, kept through ``on_replay``; ``lookup`` as in choose_kernels).

        On a GPU the next probe's replay is queued before the last one is scored (its pixels saved and compared
        on a worker thread: ~1 s a 1024px preview that would otherwise leave the GPU idle); a set that differs
        past its first preview then costs the one replay already queued."""
        trial = {"kernels": spec, "identical": False, "probes_identical": 0, "probes_tried": 0,
                 "ssim": 1.0, "max_abs_diff": 0, "mean_abs_diff": 0.0}

        def record(score) -> bool:
            metrics = score.metrics
            trial["probes_tried"] += 1
            trial["ssim"] = round(min(trial["ssim"], float(metrics.ssim)), 5)
            trial["max_abs_diff"] = max(trial["max_abs_diff"], int(metrics.max_abs_diff))
            trial["mean_abs_diff"] = round(max(trial["mean_abs_diff"], float(metrics.mean_abs_diff)), 4)
            if score.verdict.value != "EXACT":
                return False
            trial["probes_identical"] += 1
            return True

        on_gpu = self.options.device.startswith("cuda")
        ahead = 1 if on_gpu else 0  # replays queued beyond the one being scored
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-probe") as worker:
            queued: deque = deque()
            for probe in probes:
                replay = self.replay_or_cached(probe, lookup=lookup, deferred=on_gpu)
                queued.append(worker.submit(probe_score, probe, self.noise_algorithm, replay, score_fn, on_replay))
                if len(queued) > ahead and not record(queued.popleft().result()):
                    break
            else:
                while queued and record(queued.popleft().result()):
                    pass
        trial["identical"] = trial["probes_identical"] == len(probes)
        return trial

    def fast_drift(self, probes: list[ReplayItem]) -> dict | None:
        """``--fast`` against exact mode on the same previews: both replayed here, pixels compared (the drift the
        report header shows for a ``--fast`` run)."""
        from parity.scores import compute_metrics

        if not self.options.fast or not probes:
            return None
        rows = []
        for item in probes:
            fast = self.replay(item).pixels
            self.pipeline.fast = False
            try:
                exact = self.replay(item).pixels
            finally:
                self.pipeline.fast = True
            metrics = compute_metrics(exact, fast)[0]
            rows.append({"preview": item.file, "ssim": round(float(metrics.ssim), 5),
                         "max_abs_diff": int(metrics.max_abs_diff),
                         "mean_abs_diff": round(float(metrics.mean_abs_diff), 4)})
        return {"what": "--fast vs exact mode", "previews": rows,
                "ssim_min": min(r["ssim"] for r in rows), "max_abs_diff": max(r["max_abs_diff"] for r in rows)}

    def _noise_for(self, item: ReplayItem, algorithm: str):
        import torch

        from pipelines.omnigen2 import noise

        shape = (1, self.pipeline.c.transformer.config.in_channels, item.gen_height // 8, item.gen_width // 8)
        return noise.draw_initial_noise(int(item.seed), shape, algorithm, dtype=getattr(torch, self.dtype_name))

    # -- replay --------------------------------------------------------------------------------------------
    def request(self, item: ReplayItem, algorithm: str, knobs: Knobs = Knobs()):
        from PIL import Image

        from pipelines.omnigen2.pipeline import ReplayRequest

        refs = ()
        if item.ctrl_img:
            refs = (Image.open(item.ctrl_img),)
        negative = item.negative_prompt or ""
        negative_passes = knobs.negative_template_passes
        if negative == "" and knobs.empty_negative_template_passes is not None:
            negative_passes = knobs.empty_negative_template_passes
        return ReplayRequest(
            prompt=item.prompt,
            negative_prompt=negative,
            chat_template_passes=knobs.prompt_template_passes,
            negative_chat_template_passes=negative_passes,
            seed=int(item.seed),
            width=int(item.width),
            height=int(item.height),
            num_inference_steps=int(item.num_inference_steps),
            guidance_scale=float(item.guidance_scale),
            reference_images=refs,
            noise_algorithm=algorithm,
        )

    def cache_key(self, item: ReplayItem, algorithm: str, key_parts: list, knobs: Knobs = Knobs()) -> str:
        from pipelines.omnigen2 import kernels
        from pipelines.omnigen2.cpu_profile import active_cpu_profile

        fields = {
            "parity": __version__,
            "base": self._base_fingerprint,
            "item": {k: getattr(item, k) for k in (
                "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps",
                "guidance_scale", "ctrl_img")},
            "ctrl": file_digest(Path(item.ctrl_img)) if item.ctrl_img else None,
            "weights": key_parts,
            "noise": algorithm,
            "dtype": self.dtype_name,
            "device": self.options.device,
            "kernels": kernels.kernel_profile(),
            "cpu": active_cpu_profile() if self.options.device == "cpu" else None,
            "quantize": [self.plan.quantize, self.plan.qtype, self.plan.quantize_te, self.plan.qtype_te],
            "knobs": knobs.changed(),
        }
        if self.options.fast:
            fields["mode"] = "fast"
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def prepare(self, item: ReplayItem, algorithm: str | None = None, knobs: Knobs = Knobs()) -> tuple[str, dict]:
        """Apply ``item``'s weights and return its cache key and what the replay ran with (no pixels yet)."""
        algorithm = algorithm or self.noise_algorithm
        weights, residuals, problem, parts = self._apply(item, knobs)
        info = {"weights": weights, "residuals": residuals, "lora_problem": problem, "noise": algorithm}
        return self.cache_key(item, algorithm, parts, knobs), info

    def replay(
        self, item: ReplayItem, algorithm: str | None = None, knobs: Knobs = Knobs(), deferred: bool = False
    ) -> Replay:
        """Replay ``item`` (which must be replayable) with ``knobs`` and return its pixels. ``deferred``: return
        once the decode is queued; ``Replay.wait()`` gives the pixels (from any thread)."""
        if not item.replayable:
            raise ValueError(f"{item.file} is not replayable: {item.reason}")
        algorithm = algorithm or self.noise_algorithm
        if algorithm == "auto":
            raise ValueError("choose the noise algorithm first (choose_noise_algorithm)")
        key, info = self.prepare(item, algorithm, knobs)
        self._select_text_encoder(knobs)
        generation = knobs.output_size == "generation" and quirks_generation_size(item) != (item.width, item.height)
        output = self.pipeline(self.request(item, algorithm, knobs), deferred=deferred and not generation)
        pixels = output.pixels
        if generation:
            pixels = generation_size_output(self.pipeline, output)
        return Replay(pixels, key, info["weights"], info["residuals"], info["lora_problem"], pending=output.pending)

    def replay_or_cached(self, item: ReplayItem, algorithm: str | None = None, lookup=None,
                         deferred: bool = False) -> Replay:
        """``item``'s replay, or the pixels ``lookup(item, key)`` finds in the replay cache for its key (then
        nothing is replayed: ``Replay.cached``)."""
        if lookup is not None:
            key, info = self.prepare(item, algorithm)
            pixels = lookup(item, key)
            if pixels is not None:
                return Replay(pixels, key, info["weights"], info["residuals"], info["lora_problem"], cached=True)
        return self.replay(item, algorithm, deferred=deferred)

    def _select_text_encoder(self, knobs: Knobs) -> None:
        """Swap in a quantised (or plain) text encoder when the knob asks for the other one."""
        want = self.plan.quantize_te if knobs.te_quantized is None else knobs.te_quantized
        components = self.pipeline.c
        if self._mllm_variants is None:
            self._mllm_variants = {self.plan.quantize_te: components.mllm}
        if want not in self._mllm_variants:
            import torch

            from pipelines.omnigen2.loading import load_mllm

            fresh = load_mllm(components.root, getattr(torch, self.dtype_name), components.device)
            if want:
                quantize_module(fresh, self.plan.qtype_te or "qfloat8", "text encoder")
            self._mllm_variants[want] = fresh
        components.mllm = self._mllm_variants[want]


def probe_score(item: ReplayItem, algorithm: str, replay: Replay, score_fn, on_replay=None):
    """A choice's probe replay finished: its pixels (waiting for a deferred decode), handed to ``on_replay`` when
    fresh (to cache them), and scored with ``score_fn(item, pixels)``. Runs on the choices' worker thread."""
    pixels = replay.wait()
    if on_replay is not None and not replay.cached:
        on_replay(item, algorithm, replay)
    return score_fn(item, pixels)


def ssim_and_exact(score) -> tuple[float, bool]:
    """A probe's SSIM and whether its replay reproduced the preview (EXACT), from a ``parity.scores`` Score; a bare
    SSIM (a caller that scores only that) is never taken for EXACT."""
    metrics = getattr(score, "metrics", None)
    if metrics is None:
        return float(score), False
    return float(metrics.ssim), score.verdict.value == "EXACT"


def merged_trial(first: dict, shares: list[dict], probes: int) -> dict:
    """A kernel trial on the first preview joined with the trials of the others' shares (see choose_kernels)."""
    trial = dict(first)
    for share in shares:
        trial["probes_tried"] += share["probes_tried"]
        trial["probes_identical"] += share["probes_identical"]
        trial["ssim"] = min(trial["ssim"], share["ssim"])
        trial["max_abs_diff"] = max(trial["max_abs_diff"], share["max_abs_diff"])
        trial["mean_abs_diff"] = max(trial["mean_abs_diff"], share["mean_abs_diff"])
    trial["identical"] = trial["probes_identical"] == probes
    return trial


def quirks_generation_size(item: ReplayItem) -> tuple[int, int]:
    from pipelines.omnigen2 import quirks

    return quirks.generation_size(int(item.width), int(item.height))


def generation_size_output(pipe, output) -> np.ndarray:
    """The image a server returns: decoded at the generation size, not resized back to the request."""
    import torch

    from pipelines.omnigen2 import quirks

    w, h = output.generation_size
    with torch.no_grad():
        return quirks.decode_to_pixels(pipe.c.vae, output.final_latents, w, h)


def model_fingerprint(root: Path) -> str:
    """Identity of a base model folder: every file's relative path, size and modification time."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def quantize_module(module, qtype: str, what: str) -> None:
    """Quantise weights in place with optimum-quanto, as ai-toolkit does for quantize / quantize_te."""
    try:
        from optimum import quanto
    except ImportError:
        raise EnvironmentProblem(
            None, f"the job quantised its {what} ({qtype}); install optimum-quanto to replay it: pip install optimum-quanto"
        ) from None
    try:
        weights = getattr(quanto, qtype)
    except AttributeError:
        raise InputError(None, f"unsupported quantisation type {qtype!r} for the {what}") from None
    quanto.quantize(module, weights=weights)
    quanto.freeze(module)
