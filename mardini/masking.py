"""Frame masks and the mask-ratio curriculum.

MarDini trains one model for many tasks by masking frames: a mask `[T]` (bool, True = frame to GENERATE,
False = given reference frame) decides which frames the planner sees and which the generator denoises.
The curriculum moves training from easy to hard: first interpolation (many references, few masked frames
between them), then mixtures with growing mask ratios and more expansion / image-to-video, and finally mostly
image-to-video (one reference, (T-1)/T masked). Because the model learns to animate a single frame this way,
no separate image pre-training is needed. Stage boundaries are fractions of the run (``train.max_steps``), so one
curriculum serves a 40-step smoke test and a 20k-step run alike; the paper's progression is written once, in
configs/curriculum/paper.yaml.

Contents, in reading order:
  configs     MaskStrategyConfig, CurriculumStage, CurriculumConfig (also usable as Hydra structured configs)
  validation  validate_curriculum, check_curriculum_reaches, stage_steps, curriculum_from_dict
  strategies  make_mask: one strategy -> one mask [T]
  sampling    MaskSampler: curriculum + run length + global step -> masks [T] / [B, T]; mask_generator
  inference   task_mask: deterministic masks for the inference / evaluation tasks; mask_ratio
  presets     interpolation_only, i2v_finetune

All randomness goes through an explicit CPU `torch.Generator`, so a mask is a pure function of its generator's
seed. Config objects are read by attribute only, so an OmegaConf DictConfig with the same fields works too.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

STRATEGIES = ("interpolation", "i2v", "expand_forward", "expand_backward", "random")
I2V_POSITIONS = ("first", "middle", "last", "random")
TASKS = ("interpolation", "i2v", "expand_forward", "expand_backward", "loop")

_EPS = 1e-9  # slack when comparing ratios such as 3/10 with a bound 0.3


# -----------------------------------------------------------------------------
# configs


@dataclass
class MaskStrategyConfig:
    name: str = "interpolation"  # interpolation | i2v | expand_forward | expand_backward | random
    weight: float = 1.0  # relative weight inside a stage's mixture; must be > 0
    position: str = "random"  # i2v only: first | middle | last | random
    keep_every: int = 0  # interpolation only: 0 = first+last (or k from the ratio range); k >= 2 keeps 0,k,2k,... and T-1


@dataclass
class CurriculumStage:
    start: float = 0.0  # where the stage begins, as a fraction of train.max_steps (the first stage starts at 0)
    end: Optional[float] = None  # exclusive end, a fraction of train.max_steps; null = 1 (the last stage only)
    strategies: List[MaskStrategyConfig] = field(default_factory=lambda: [MaskStrategyConfig()])  # weighted mixture of mask strategies used during this stage
    mask_ratio: List[float] = field(default_factory=lambda: [0.1, 0.9])  # [min, max] masked fraction


@dataclass
class CurriculumConfig:
    stages: List[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])  # consecutive fractions of the run tiling [0, 1]; each draws masks from its own mixture


# -----------------------------------------------------------------------------
# validation


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(obj, key: str, path: str):
    """Attribute access that turns a missing field into a ValueError naming it."""
    try:
        return getattr(obj, key)
    except AttributeError:
        raise ValueError(f"{path}.{key} is missing") from None


def _check_ratio(ratio, path: str) -> tuple:
    """`ratio` must be [min, max] with 0 < min <= max < 1; returns (min, max) as floats."""
    try:
        values = list(ratio)
    except TypeError:
        values = None
    if values is None or len(values) != 2 or not all(_is_number(v) for v in values):
        raise ValueError(f"{path} must be two numbers [min, max], got {ratio!r}")
    lo, hi = float(values[0]), float(values[1])
    if not 0.0 < lo < 1.0 or not 0.0 < hi < 1.0:
        raise ValueError(f"{path} values must lie strictly inside (0, 1), got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"{path} must have min <= max, got [{lo}, {hi}]")
    return lo, hi


def _check_strategy(s, path: str) -> None:
    name = _get(s, "name", path)
    if name == "loop":
        raise ValueError(f"{path}.name=loop is not a training strategy (it drew the same first + last masks as "
                         f"interpolation): use interpolation; looping is an inference task (MarDiniPipeline.loop)")
    if name not in STRATEGIES:
        raise ValueError(f"{path}.name must be one of {', '.join(STRATEGIES)}; got {name!r}")
    weight = _get(s, "weight", path)
    if not _is_number(weight) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{path}.weight must be > 0, got {weight!r}")
    position = _get(s, "position", path)
    if position not in I2V_POSITIONS:
        raise ValueError(f"{path}.position must be one of {', '.join(I2V_POSITIONS)}; got {position!r}")
    keep_every = _get(s, "keep_every", path)
    if not _is_int(keep_every) or keep_every < 0:
        raise ValueError(f"{path}.keep_every must be an integer >= 0, got {keep_every!r}")
    if keep_every == 1:
        raise ValueError(f"{path}.keep_every=1 would keep every frame (nothing to generate); use 0 or >= 2")


def _is_fraction(x) -> bool:
    return _is_number(x) and math.isfinite(x) and 0.0 <= x <= 1.0


def validate_curriculum(cfg, name: str = "curriculum") -> None:
    """Raise ValueError naming the offending key (e.g. 'curriculum.stages[1].mask_ratio') if `cfg` is unusable.

    Stage boundaries are fractions of train.max_steps: the stages must be sorted, start at 0 and tile [0, 1]
    without gaps or overlaps; only the last one may leave `end` null (= 1).
    """
    stages = _get(cfg, "stages", name)
    if stages is None or len(stages) == 0:
        raise ValueError(f"{name}.stages must be a non-empty list of stages")
    spans = []  # (start, end) per stage, end None = 1
    for i, st in enumerate(stages):  # each stage on its own
        path = f"{name}.stages[{i}]"
        start, end = _get(st, "start", path), _get(st, "end", path)
        if not _is_fraction(start) or start >= 1:
            raise ValueError(f"{path}.start must be a fraction of train.max_steps in [0, 1), got {start!r}")
        if end is not None and not _is_fraction(end):
            raise ValueError(f"{path}.end must be a fraction of train.max_steps in (0, 1] or null, got {end!r}")
        if end is not None and end <= start:
            raise ValueError(f"{path}.end must be > start, got start={start}, end={end}")
        strategies = _get(st, "strategies", path)
        if strategies is None or len(strategies) == 0:
            raise ValueError(f"{path}.strategies must be a non-empty list")
        for j, s in enumerate(strategies):
            _check_strategy(s, f"{path}.strategies[{j}]")
        _check_ratio(_get(st, "mask_ratio", path), f"{path}.mask_ratio")
        spans.append((start, end))
    if spans[0][0] != 0:  # then how the stages fit together
        raise ValueError(f"{name}.stages[0].start must be 0 (the first stage starts training), got {spans[0][0]}")
    for i in range(1, len(spans)):
        if spans[i][0] < spans[i - 1][0]:
            raise ValueError(f"{name}.stages must be sorted by start: stages[{i}].start={spans[i][0]} < "
                             f"stages[{i - 1}].start={spans[i - 1][0]}")
    for i in range(1, len(spans)):
        (_, prev_end), (start, _) = spans[i - 1], spans[i]
        if prev_end is None:
            raise ValueError(f"{name}.stages[{i - 1}].end is null (until the end of training) but it is not the "
                             f"last stage")
        if start < prev_end:
            raise ValueError(f"{name}.stages[{i}] overlaps stages[{i - 1}]: start={start} < "
                             f"stages[{i - 1}].end={prev_end}")
        if start > prev_end:
            raise ValueError(f"gap before {name}.stages[{i}]: fractions {prev_end}..{start} of the run have no stage "
                             f"(stages[{i - 1}].end={prev_end}, stages[{i}].start={start})")
    last_end = spans[-1][1]
    if last_end is not None and last_end != 1:
        raise ValueError(f"{name}.stages[{len(spans) - 1}].end={last_end}: the last stage must reach the end of "
                         f"training (end: null or 1.0)")


def fraction_to_step(fraction: float, max_steps: int) -> int:
    """The first step at `fraction` of a max_steps-step run (rounded half up, so 0.25 of 10 is step 3)."""
    return math.floor(fraction * max_steps + 0.5)


def stage_steps(cfg, max_steps: int) -> List[int]:
    """First step of each stage of a validated curriculum for a run of max_steps steps."""
    return [fraction_to_step(st.start, max_steps) for st in cfg.stages]


def check_curriculum_reaches(cfg, max_steps: int, name: str = "curriculum") -> None:
    """Fail before training if a stage would get no step in a max_steps-step run (it would be skipped)."""
    validate_curriculum(cfg, name)
    if not _is_int(max_steps) or max_steps <= 0:
        raise ValueError(f"train.max_steps must be a positive integer, got {max_steps!r}")
    empty = _empty_stages(cfg, max_steps)
    if empty:
        i, st = empty[0], cfg.stages[empty[0]]
        shortest = next((n for n in range(len(cfg.stages), 100_001) if not _empty_stages(cfg, n)), None)
        raise ValueError(
            f"{name}.stages[{i}] (start={st.start}, end={st.end}) gets no step at train.max_steps={max_steps}: "
            f"raise train.max_steps (to at least {shortest}) or use a curriculum with fewer stages "
            f"(e.g. curriculum=interpolation)")


def _empty_stages(cfg, max_steps: int) -> List[int]:
    starts = stage_steps(cfg, max_steps) + [max_steps]
    return [i for i in range(len(cfg.stages)) if starts[i + 1] <= starts[i]]


_STRATEGY_KEYS = {"name", "weight", "position", "keep_every"}
_STAGE_KEYS = {"start", "end", "strategies", "mask_ratio"}


def _strategy_from_dict(d, path: str) -> MaskStrategyConfig:
    if isinstance(d, str):  # shorthand: "i2v" == {"name": "i2v"}
        return MaskStrategyConfig(name=d)
    unknown = set(d) - _STRATEGY_KEYS
    if unknown:
        raise ValueError(f"{path} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_STRATEGY_KEYS)}")
    return MaskStrategyConfig(**d)


def curriculum_from_dict(d) -> CurriculumConfig:
    """Build (and validate) a CurriculumConfig from plain data.

    `d` is {"stages": [...]} or the list of stages itself; a stage is a dict with the CurriculumStage fields,
    a strategy a dict with the MaskStrategyConfig fields or just its name.
    """
    stages_data = d["stages"] if isinstance(d, dict) else d
    if isinstance(d, dict) and set(d) - {"stages"}:
        raise ValueError(f"curriculum has unknown key(s) {sorted(set(d) - {'stages'})}; allowed: ['stages']")
    stages = []
    for i, sd in enumerate(stages_data):
        path = f"curriculum.stages[{i}]"
        unknown = set(sd) - _STAGE_KEYS
        if unknown & {"start_step", "end_step"}:
            raise ValueError(f"{path} uses start_step/end_step: stage boundaries are now fractions of "
                             f"train.max_steps; write start/end (e.g. start: 0.25, end: 0.5)")
        if unknown:
            raise ValueError(f"{path} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}")
        kw = dict(sd)
        if "strategies" in kw:
            kw["strategies"] = [_strategy_from_dict(s, f"{path}.strategies[{j}]")
                                for j, s in enumerate(kw["strategies"])]
        if "mask_ratio" in kw and not isinstance(kw["mask_ratio"], (str, int, float)):
            kw["mask_ratio"] = list(kw["mask_ratio"])
        stages.append(CurriculumStage(**kw))
    cfg = CurriculumConfig(stages=stages)
    validate_curriculum(cfg)
    return cfg


def _to_dataclasses(cfg) -> CurriculumConfig:
    """Copy a validated config (dataclass or DictConfig, read by attribute) into plain dataclasses."""
    return CurriculumConfig(stages=[
        CurriculumStage(
            start=float(st.start),
            end=None if st.end is None else float(st.end),
            strategies=[MaskStrategyConfig(name=str(s.name), weight=float(s.weight), position=str(s.position),
                                           keep_every=int(s.keep_every)) for s in st.strategies],
            mask_ratio=[float(r) for r in st.mask_ratio],
        )
        for st in cfg.stages
    ])


# -----------------------------------------------------------------------------
# strategies: one strategy -> one mask [T] (True = generate)


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _rand(g: torch.Generator) -> float:
    """Uniform float in [0, 1)."""
    return float(torch.rand(1, generator=g))


def _pick(candidates: Sequence[int], ratios: Sequence[float], lo: float, hi: float, g: torch.Generator) -> int:
    """Uniform over the candidates whose ratio lies in [lo, hi]; if none, the closest one (first on ties)."""
    inside = [c for c, r in zip(candidates, ratios) if lo - _EPS <= r <= hi + _EPS]
    if inside:
        return inside[_randint(0, len(inside) - 1, g)]
    dist = [max(lo - r, r - hi) for r in ratios]
    return candidates[dist.index(min(dist))]


def _keep_pattern(num_frames: int, k: int) -> torch.Tensor:
    """Keep frames 0, k, 2k, ... and T-1, generate the rest. -> [T] bool. k >= T-1 is first+last."""
    mask = torch.ones(num_frames, dtype=torch.bool)
    mask[::k] = False
    mask[-1] = False
    return mask


def _edge_mask(num_frames: int, num_given: int, forward: bool) -> torch.Tensor:
    """Keep a prefix (forward) or suffix (backward) of `num_given` frames. -> [T] bool."""
    mask = torch.ones(num_frames, dtype=torch.bool)
    if forward:
        mask[:num_given] = False
    else:
        mask[num_frames - num_given:] = False
    return mask


def _interpolation_candidates(T: int) -> tuple[list[int], list[float]]:
    """Keep-every k in 2..T-1 (T-1 is first + last; larger k give the same mask) and each one's mask ratio."""
    ks = list(range(2, T))
    return ks, [_keep_pattern(T, k).sum().item() / T for k in ks]


def _expansion_candidates(T: int) -> tuple[list[int], list[float]]:
    """Counts of masked frames 1..T-1 (T - count frames kept) and each one's mask ratio."""
    counts = list(range(1, T))
    return counts, [c / T for c in counts]


def _check_num_frames(num_frames) -> None:
    if not _is_int(num_frames) or num_frames < 2:
        raise ValueError(f"num_frames must be an integer >= 2 (one reference + one generated frame), "
                         f"got {num_frames!r}")


def _make_mask(s, num_frames: int, g: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """make_mask without validation (the sampler validated the curriculum once)."""
    T = num_frames
    if s.name == "interpolation":
        if T == 2:  # no frame lies between first and last: keep the first, generate the second
            return torch.tensor([False, True])
        if s.keep_every == 0 and lo - _EPS <= (T - 2) / T <= hi + _EPS:
            return _keep_pattern(T, T - 1)  # first + last
        if s.keep_every > 0:
            return _keep_pattern(T, s.keep_every)
        ks, ratios = _interpolation_candidates(T)
        return _keep_pattern(T, _pick(ks, ratios, lo, hi, g))
    if s.name == "i2v":
        index = {"first": 0, "middle": T // 2, "last": T - 1}.get(s.position)
        if index is None:  # "random"
            index = _randint(0, T - 1, g)
        mask = torch.ones(T, dtype=torch.bool)
        mask[index] = False
        return mask
    if s.name in ("expand_forward", "expand_backward"):
        n = _pick(*_expansion_candidates(T), lo, hi, g)
        return _edge_mask(T, T - n, forward=s.name == "expand_forward")
    if s.name == "random":
        ratio = lo + (hi - lo) * _rand(g)
        n = min(max(math.floor(ratio * T + 0.5), 1), T - 1)  # round half up, then clamp to [1, T-1]
        mask = torch.zeros(T, dtype=torch.bool)
        mask[torch.randperm(T, generator=g)[:n]] = True
        return mask
    raise ValueError(f"unknown mask strategy {s.name!r}; expected one of {', '.join(STRATEGIES)}")


def make_mask(strategy, num_frames: int, generator: torch.Generator, mask_ratio=(0.1, 0.9)) -> torch.Tensor:
    """Draw one mask `[T]` (bool, True = generate) for `strategy` using only `generator` for randomness.

    Every strategy keeps >= 1 reference and generates >= 1 frame for T >= 2.
      interpolation    keep 0 and T-1 (keep_every=k: 0,k,2k,... and T-1). With keep_every=0 and (T-2)/T outside
                       mask_ratio, k is drawn uniformly among the k in 2..T-1 whose ratio is inside (else closest).
                       T=2 has no interior frame: frame 0 is kept and frame 1 generated.
      i2v              one reference at first=0 | middle=T//2 | last=T-1 | random (uniform); ratio (T-1)/T.
      expand_forward   keep a prefix of T-n frames; expand_backward keeps a suffix. n is uniform over the counts
                       with n/T in mask_ratio (else the closest count).
      random           ratio r ~ U[min, max], n = round_half_up(r*T) clamped to [1, T-1], then a uniform subset;
                       so n/T lies within 1/(2T) of [min, max] unless clamped.
    """
    _check_strategy(strategy, "strategy")
    lo, hi = _check_ratio(mask_ratio, "mask_ratio")
    _check_num_frames(num_frames)
    return _make_mask(strategy, num_frames, generator, lo, hi)


def unreachable_ratios(cfg, num_frames: int) -> List[str]:
    """Describe each (stage, strategy) whose stage mask_ratio no mask of `num_frames` frames can meet.

    make_mask then uses the closest ratio, which trains a different task than the curriculum says (e.g. an
    interpolation stage at [0.75, 0.95] on 5 frames trains at 0.6). i2v and interpolation with keep_every > 0 have
    a fixed ratio that ignores mask_ratio by design, and random only rounds its ratio: they are not reported.
    """
    cfg = cfg if isinstance(cfg, CurriculumConfig) else curriculum_from_dict(cfg)
    _check_num_frames(num_frames)
    T, problems = num_frames, []
    for i, st in enumerate(cfg.stages):
        lo, hi = st.mask_ratio
        for s in st.strategies:
            if s.name == "interpolation" and s.keep_every == 0 and T > 2:
                ratios = _interpolation_candidates(T)[1]
            elif s.name in ("expand_forward", "expand_backward"):
                ratios = _expansion_candidates(T)[1]
            else:  # random rounds r T to a count, near [lo, hi] by design (see make_mask)
                continue
            if any(lo - _EPS <= r <= hi + _EPS for r in ratios):
                continue
            closest = min(ratios, key=lambda r: max(lo - r, r - hi))
            problems.append(f"curriculum.stages[{i}] {s.name}: no mask of {T} frames has a ratio in "
                            f"mask_ratio=[{lo:g}, {hi:g}]; it uses the closest, {closest:.3f}")
    return problems


# -----------------------------------------------------------------------------
# sampling from the curriculum


class MaskSampler:
    """Turns a curriculum, the run length and the global training step into masks.

    For each sample: find the stage of `step` (stage boundaries are fractions of max_steps, see stage_steps), pick
    a strategy with probability weight / sum(weights), then draw its mask, all from the sample's own generator (so
    a mask depends only on that generator). Steps at or past max_steps belong to the last stage.
    """

    def __init__(self, curriculum, max_steps: int):
        if isinstance(curriculum, (dict, list)):
            curriculum = curriculum_from_dict(curriculum)
        check_curriculum_reaches(curriculum, max_steps)
        self.curriculum = _to_dataclasses(curriculum)
        self.stages = self.curriculum.stages
        self.max_steps = max_steps
        self.stage_starts = stage_steps(self.curriculum, max_steps)  # first step of each stage
        # cumulative strategy weights per stage, normalised to end at 1.0
        self._cum_weights = []
        for st in self.stages:
            total = sum(s.weight for s in st.strategies)
            cum, acc = [], 0.0
            for s in st.strategies:
                acc += s.weight / total
                cum.append(acc)
            cum[-1] = 1.0
            self._cum_weights.append(cum)

    def stage_index(self, step: int) -> int:
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return max(i for i, start in enumerate(self.stage_starts) if start <= step)

    def stage_at(self, step: int) -> CurriculumStage:
        return self.stages[self.stage_index(step)]

    def choose_strategy(self, step: int, generator: torch.Generator) -> MaskStrategyConfig:
        """Pick a strategy of the stage at `step`, with probability proportional to its weight (one draw)."""
        i = self.stage_index(step)
        u = _rand(generator)
        cum = self._cum_weights[i]
        j = next((j for j, c in enumerate(cum) if u < c), len(cum) - 1)
        return self.stages[i].strategies[j]

    def sample_with_strategy(self, step: int, num_frames: int, generator: torch.Generator):
        """-> (mask [T], the MaskStrategyConfig that drew it); handy for logging strategy frequencies."""
        _check_num_frames(num_frames)
        stage = self.stage_at(step)
        strategy = self.choose_strategy(step, generator)
        lo, hi = stage.mask_ratio
        return _make_mask(strategy, num_frames, generator, lo, hi), strategy

    def sample(self, step: int, num_frames: int, generator: torch.Generator) -> torch.Tensor:
        """One mask [T] (bool, True = generate)."""
        return self.sample_with_strategy(step, num_frames, generator)[0]

    def sample_batch(self, step: int, batch_size: int, num_frames: int,
                     generators: List[torch.Generator]) -> torch.Tensor:
        """Masks [B, T], sample b drawn from generators[b] (so it does not depend on the batch composition)."""
        if len(generators) != batch_size:
            raise ValueError(f"need one generator per sample: batch_size={batch_size}, got {len(generators)}")
        return torch.stack([self.sample(step, num_frames, g) for g in generators])


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def mask_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, sample index) by integer hashing (stable across runs/machines).

    Masks drawn from it are independent of batch size, world size and sample order, so resuming reproduces them.
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ step) ^ index)
    return torch.Generator().manual_seed(h)


# -----------------------------------------------------------------------------
# inference / evaluation


def task_mask(task: str, num_frames: int, *, position="middle", num_given: int = 1,
              keep_every: int = 0) -> torch.Tensor:
    """Deterministic mask [T] (bool, True = generate) for an inference task.

    interpolation    keep 0 and T-1, or 0,k,2k,... and T-1 with keep_every=k >= 2
    i2v              keep one frame: position is an index (negative counts from the end) or first|middle|last
    expand_forward   keep the first num_given frames; expand_backward keeps the last num_given
    loop             keep 0 and T-1 (the caller puts the same frame at both ends)
    Unlike make_mask this never changes the task: a request that leaves no frame to generate raises ValueError.
    """
    _check_num_frames(num_frames)
    T = num_frames
    if task in ("interpolation", "loop"):
        if not _is_int(keep_every) or keep_every < 0 or keep_every == 1:
            raise ValueError(f"keep_every must be 0 or an integer >= 2, got {keep_every!r}")
        k = T - 1 if task == "loop" or keep_every == 0 else keep_every
        mask = _keep_pattern(T, k)
        if not mask.any():
            raise ValueError(f"{task} with num_frames={T} leaves no frame to generate")
        return mask
    if task == "i2v":
        if isinstance(position, str):
            if position not in ("first", "middle", "last"):
                raise ValueError(f"i2v position must be an index or one of first, middle, last; got {position!r}")
            index = {"first": 0, "middle": T // 2, "last": T - 1}[position]
        elif _is_int(position) and -T <= position < T:
            index = position % T
        else:
            raise ValueError(f"i2v position must be an index in [-{T}, {T - 1}] for num_frames={T}, "
                             f"got {position!r}")
        mask = torch.ones(T, dtype=torch.bool)
        mask[index] = False
        return mask
    if task in ("expand_forward", "expand_backward"):
        if not _is_int(num_given) or not 1 <= num_given <= T - 1:
            raise ValueError(f"num_given must be an integer in [1, {T - 1}] for num_frames={T}, got {num_given!r}")
        return _edge_mask(T, num_given, forward=task == "expand_forward")
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def mask_ratio(mask) -> float:
    """Fraction of generated frames: over [T], or over all B*T entries of a [B, T] batch."""
    mask = torch.as_tensor(mask)
    return int(mask.sum()) / mask.numel()  # exact count / total, no float32 rounding


# -----------------------------------------------------------------------------
# single-stage curricula (configs/curriculum/interpolation.yaml and i2v_finetune.yaml mirror these; the paper's
# multi-stage progression exists only as configs/curriculum/paper.yaml)


def interpolation_only() -> CurriculumConfig:
    """First+last interpolation for the whole run (the range admits (T-2)/T for 3 <= T <= 200)."""
    return CurriculumConfig(stages=[CurriculumStage(
        start=0.0, end=None,
        strategies=[MaskStrategyConfig(name="interpolation")],
        mask_ratio=[0.1, 0.99],
    )])


def i2v_finetune() -> CurriculumConfig:
    """Image-to-video only, reference position uniform over the clip, for the whole run."""
    return CurriculumConfig(stages=[CurriculumStage(
        start=0.0, end=None,
        strategies=[MaskStrategyConfig(name="i2v", position="random")],
        mask_ratio=[0.1, 0.9],
    )])
