"""Tests for mardini.masking: strategy semantics, reproducibility, curriculum statistics and validation."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from helpers_training import paper_curriculum
from mardini.masking import (
    STRATEGIES,
    CurriculumConfig,
    CurriculumStage,
    MaskSampler,
    MaskStrategyConfig,
    check_curriculum_reaches,
    curriculum_from_dict,
    i2v_finetune,
    interpolation_only,
    make_mask,
    mask_generator,
    mask_ratio,
    stage_steps,
    task_mask,
    unreachable_ratios,
    validate_curriculum,
)

TS = (2, 3, 5, 9, 17)
SEEDS = range(40)
RATIOS = [(0.1, 0.9), (0.3, 0.6), (0.01, 0.02), (0.97, 0.99), (0.5, 0.5)]  # incl. infeasible -> fallback


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(mask) -> list:
    """Indices of reference (kept) frames."""
    return (~mask).nonzero().flatten().tolist()


def all_strategy_configs():
    out = [MaskStrategyConfig(name=n) for n in STRATEGIES]
    out += [MaskStrategyConfig(name="i2v", position=p) for p in ("first", "middle", "last")]
    out += [MaskStrategyConfig(name="interpolation", keep_every=k) for k in (2, 3, 4, 7)]
    return out


def stage(start, end, strategies, ratio=(0.1, 0.9)):
    """A stage from start to end, fractions of train.max_steps (end None = the end of training)."""
    return CurriculumStage(start=start, end=end, strategies=list(strategies), mask_ratio=list(ratio))


# -----------------------------------------------------------------------------
# strategies


@pytest.mark.parametrize("cfg", all_strategy_configs(), ids=lambda c: f"{c.name}-{c.position}-k{c.keep_every}")
def test_every_strategy_has_reference_and_masked_frame(cfg):
    for T in TS:
        for ratio in RATIOS:
            for seed in SEEDS:
                m = make_mask(cfg, T, gen(seed), ratio)
                assert m.shape == (T,) and m.dtype == torch.bool
                assert m.any() and not m.all(), (cfg, T, ratio, seed, m)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("T", [0, 1])
def test_too_few_frames_raise(name, T):
    with pytest.raises(ValueError, match="num_frames"):
        make_mask(MaskStrategyConfig(name=name), T, gen(0))


def test_i2v_positions():
    for T in TS:
        for seed in range(10):
            for pos, idx in [("first", 0), ("middle", T // 2), ("last", T - 1)]:
                m = make_mask(MaskStrategyConfig(name="i2v", position=pos), T, gen(seed))
                assert kept(m) == [idx]
                assert mask_ratio(m) == pytest.approx((T - 1) / T)
    seen = set()
    for seed in range(200):
        m = make_mask(MaskStrategyConfig(name="i2v", position="random"), 5, gen(seed))
        assert len(kept(m)) == 1
        seen.add(kept(m)[0])
    assert seen == set(range(5))  # random position covers every frame


@pytest.mark.parametrize("name", ["expand_forward", "expand_backward"])
def test_expansion_keeps_prefix_or_suffix(name):
    for T in TS:
        for ratio in RATIOS:
            for seed in SEEDS:
                m = make_mask(MaskStrategyConfig(name=name), T, gen(seed), ratio)
                k = len(kept(m))
                expected = list(range(k)) if name == "expand_forward" else list(range(T - k, T))
                assert kept(m) == expected
                feasible = any(ratio[0] - 1e-9 <= n / T <= ratio[1] + 1e-9 for n in range(1, T))
                if feasible:
                    assert ratio[0] - 1e-9 <= mask_ratio(m) <= ratio[1] + 1e-9
    # uniform over the valid counts: T=17, [0.3, 0.6] -> masked n in 6..10
    ns = {int(make_mask(MaskStrategyConfig(name=name), 17, gen(s), (0.3, 0.6)).sum()) for s in range(300)}
    assert ns == set(range(6, 11))
    # infeasible ranges fall back to the closest count
    assert int(make_mask(MaskStrategyConfig(name=name), 5, gen(0), (0.01, 0.02)).sum()) == 1
    assert int(make_mask(MaskStrategyConfig(name=name), 5, gen(0), (0.97, 0.99)).sum()) == 4


def test_interpolation_keeps_first_and_last():
    for T in TS[1:]:
        for seed in range(10):
            m = make_mask(MaskStrategyConfig(name="interpolation"), T, gen(seed), (0.01, 0.99))
            assert kept(m) == [0, T - 1]
    # T=2 has no interior frame: keep the first, generate the second
    assert make_mask(MaskStrategyConfig(name="interpolation"), 2, gen(0)).tolist() == [False, True]


@pytest.mark.parametrize("T,k,expected", [
    (9, 2, [0, 2, 4, 6, 8]),
    (9, 3, [0, 3, 6, 8]),
    (17, 4, [0, 4, 8, 12, 16]),
    (17, 5, [0, 5, 10, 15, 16]),
    (5, 7, [0, 4]),
    (3, 2, [0, 2]),
])
def test_keep_every_pattern_exact(T, k, expected):
    for seed in range(5):  # keep_every is exact: no randomness, the ratio range is ignored
        m = make_mask(MaskStrategyConfig(name="interpolation", keep_every=k), T, gen(seed), (0.01, 0.02))
        assert kept(m) == expected
    assert kept(task_mask("interpolation", T, keep_every=k)) == expected


def test_interpolation_k_from_ratio_range():
    # T=17, (T-2)/T = 0.88 outside [0.3, 0.6]: k=2 (ratio 8/17) and k=3 (10/17) fit, k=4 (12/17) does not
    patterns = set()
    for seed in range(100):
        m = make_mask(MaskStrategyConfig(name="interpolation"), 17, gen(seed), (0.3, 0.6))
        assert 0.3 <= mask_ratio(m) <= 0.6
        patterns.add(tuple(kept(m)))
    assert patterns == {tuple(range(0, 17, 2)), tuple(range(0, 17, 3)) + (16,)}
    # no k fits [0.9, 0.95] at T=9 (max is first+last, 7/9): fall back to the closest, first+last
    assert kept(make_mask(MaskStrategyConfig(name="interpolation"), 9, gen(0), (0.9, 0.95))) == [0, 8]


def test_loop_is_no_training_strategy():
    """`loop` drew exactly the interpolation masks (the clip's last frame never equals its first in training data),
    so it is refused with a pointer to interpolation; looping stays an inference task."""
    with pytest.raises(ValueError, match=r"strategy\.name=loop is not a training strategy.*interpolation"):
        make_mask(MaskStrategyConfig(name="loop"), 9, gen(0))
    with pytest.raises(ValueError, match=r"curriculum\.stages\[0\]\.strategies\[0\]\.name=loop"):
        curriculum_from_dict({"stages": [_good_stage(strategies=[{"name": "loop"}])]})
    assert "loop" not in STRATEGIES
    assert kept(task_mask("loop", 9)) == [0, 8]


def test_random_ratio_and_rounding():
    for T in TS:
        for ratio in [(0.1, 0.9), (0.3, 0.6), (0.45, 0.55)]:
            for seed in SEEDS:
                m = make_mask(MaskStrategyConfig(name="random"), T, gen(seed), ratio)
                n = int(m.sum())
                assert 1 <= n <= T - 1
                if n not in (1, T - 1):  # not clamped: rounding moves the ratio by at most 1/(2T)
                    assert ratio[0] - 0.5 / T - 1e-9 <= n / T <= ratio[1] + 0.5 / T + 1e-9
    # round half up: 0.5 * 9 = 4.5 -> 5 masked; clamp: 0.1 * 2 = 0.2 -> 0 -> 1 masked
    assert all(int(make_mask(MaskStrategyConfig(name="random"), 9, gen(s), (0.5, 0.5)).sum()) == 5
               for s in range(10))
    assert all(int(make_mask(MaskStrategyConfig(name="random"), 2, gen(s), (0.1, 0.2)).sum()) == 1
               for s in range(10))
    # the subset is random, not always the same frames
    subsets = {tuple(make_mask(MaskStrategyConfig(name="random"), 9, gen(s), (0.5, 0.5)).tolist())
               for s in range(30)}
    assert len(subsets) > 10


# -----------------------------------------------------------------------------
# reproducibility


@pytest.mark.parametrize("cfg", all_strategy_configs(), ids=lambda c: f"{c.name}-{c.position}-k{c.keep_every}")
def test_same_seed_same_mask(cfg):
    for T in (5, 17):
        for seed in range(10):
            a = make_mask(cfg, T, gen(seed), (0.3, 0.6))
            b = make_mask(cfg, T, gen(seed), (0.3, 0.6))
            assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [
    MaskStrategyConfig(name="random"),
    MaskStrategyConfig(name="i2v", position="random"),
    MaskStrategyConfig(name="expand_forward"),
    MaskStrategyConfig(name="expand_backward"),
    MaskStrategyConfig(name="interpolation"),
], ids=lambda c: c.name)
def test_different_seeds_differ(cfg):
    masks = {tuple(make_mask(cfg, 17, gen(seed), (0.3, 0.6)).tolist()) for seed in range(20)}
    assert len(masks) > 1


def test_sampler_reproducible_and_batch_consistent():
    sampler = MaskSampler(paper_curriculum(), 1000)
    for step in (0, 300, 600, 900):
        gens = [mask_generator(123, step, i) for i in range(8)]
        batch = sampler.sample_batch(step, 8, 17, gens)
        assert batch.shape == (8, 17) and batch.dtype == torch.bool
        again = sampler.sample_batch(step, 8, 17, [mask_generator(123, step, i) for i in range(8)])
        assert torch.equal(batch, again)
        # sample b depends only on its own generator (not on batch size or order)
        assert torch.equal(batch[5], sampler.sample(step, 17, mask_generator(123, step, 5)))
        assert len({tuple(row.tolist()) for row in batch}) > 1
    with pytest.raises(ValueError, match="one generator per sample"):
        sampler.sample_batch(0, 3, 17, [gen(0)])
    assert mask_generator(1, 2, 3).initial_seed() == mask_generator(1, 2, 3).initial_seed()
    assert mask_generator(1, 2, 3).initial_seed() != mask_generator(1, 3, 2).initial_seed()


# -----------------------------------------------------------------------------
# curriculum statistics and stage boundaries


def test_strategy_frequencies_match_weights():
    strategies = [
        MaskStrategyConfig(name="interpolation", weight=1.0),
        MaskStrategyConfig(name="i2v", weight=2.0),
        MaskStrategyConfig(name="expand_forward", weight=0.5),
        MaskStrategyConfig(name="expand_backward", weight=0.5),
        MaskStrategyConfig(name="random", weight=1.0),
    ]
    lo, hi = 0.3, 0.7
    cur = CurriculumConfig(stages=[stage(0.0, 0.5, [MaskStrategyConfig(name="i2v")]),
                                   stage(0.5, None, strategies, (lo, hi))])
    sampler = MaskSampler(cur, 200)
    T, N = 17, 2000
    counts = {s.name: 0 for s in strategies}
    for i in range(N):
        mask, s = sampler.sample_with_strategy(150, T, mask_generator(0, 150, i))
        assert torch.equal(mask, sampler.sample(150, T, mask_generator(0, 150, i)))
        counts[s.name] += 1
        r = mask_ratio(mask)
        if s.name in ("interpolation", "expand_forward", "expand_backward"):  # range-driven, feasible at T=17
            assert lo - 1e-9 <= r <= hi + 1e-9, (s.name, r)
        elif s.name == "random":
            assert lo - 0.5 / T - 1e-9 <= r <= hi + 0.5 / T + 1e-9
        else:
            assert r == pytest.approx((T - 1) / T)
    total = sum(s.weight for s in strategies)
    for s in strategies:
        p = s.weight / total
        sigma = math.sqrt(N * p * (1 - p))
        assert abs(counts[s.name] - N * p) < 5 * sigma, (s.name, counts[s.name], N * p)


def test_sample_mixture_from_masks_alone():
    # i2v-first (weight 3) keeps frame 0 only; expand_backward keeps a suffix -> frame 0 is masked
    cur = CurriculumConfig(stages=[stage(0.0, None, [MaskStrategyConfig(name="i2v", weight=3.0, position="first"),
                                                     MaskStrategyConfig(name="expand_backward", weight=1.0)],
                                         (0.1, 0.5))])
    sampler = MaskSampler(cur, 10)
    N = 2000
    n_i2v = 0
    for i in range(N):
        m = sampler.sample(0, 17, gen(i))
        if not m[0]:
            assert kept(m) == [0]
            n_i2v += 1
        else:
            k = len(kept(m))
            assert kept(m) == list(range(17 - k, 17)) and 0.1 <= mask_ratio(m) <= 0.5
    assert abs(n_i2v - 0.75 * N) < 5 * math.sqrt(N * 0.75 * 0.25)


def test_stage_boundaries_are_fractions_of_the_run():
    cur = CurriculumConfig(stages=[
        stage(0.0, 0.4, [MaskStrategyConfig(name="i2v", position="last")]),
        stage(0.4, 0.625, [MaskStrategyConfig(name="i2v", position="first")]),
        stage(0.625, None, [MaskStrategyConfig(name="i2v", position="middle")]),
    ])
    sampler = MaskSampler(cur, 400)
    assert sampler.stage_starts == stage_steps(cur, 400) == [0, 160, 250]
    expected = {0: 0, 159: 0, 160: 1, 249: 1, 250: 2, 399: 2, 10**9: 2}  # steps past max_steps: the last stage
    for step, idx in expected.items():
        assert sampler.stage_index(step) == idx
        assert sampler.stage_at(step) is sampler.stages[idx]
    assert kept(sampler.sample(159, 9, gen(0))) == [8]
    assert kept(sampler.sample(160, 9, gen(0))) == [0]
    assert kept(sampler.sample(250, 9, gen(0))) == [4]
    with pytest.raises(ValueError, match="step"):
        sampler.stage_index(-1)
    # the same curriculum scales with the run; boundaries round half up (0.625 * 4 = 2.5 -> 3)
    assert MaskSampler(cur, 40).stage_starts == [0, 16, 25]
    assert MaskSampler(cur, 4).stage_starts == [0, 2, 3]
    assert MaskSampler(cur, 1000).stage_starts == [0, 400, 625]


def test_paper_curriculum_runs_at_any_length_and_grows_harder():
    pp = paper_curriculum()
    assert [(s.start, s.end) for s in pp.stages] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, None)]
    for max_steps, starts in ((40, [0, 10, 20, 30]), (300, [0, 75, 150, 225]), (20000, [0, 5000, 10000, 15000]),
                              (4, [0, 1, 2, 3])):
        check_curriculum_reaches(pp, max_steps)
        sampler = MaskSampler(pp, max_steps)
        assert sampler.stage_starts == starts
        assert [sampler.stage_index(b) for b in starts] == [0, 1, 2, 3]
    # ratio ranges grow; i2v weight share grows; the first stage is interpolation only
    assert [s.mask_ratio[1] for s in pp.stages] == sorted(s.mask_ratio[1] for s in pp.stages)
    assert [s.name for s in pp.stages[0].strategies] == ["interpolation"]

    def i2v_share(st):
        return sum(s.weight for s in st.strategies if s.name == "i2v") / sum(s.weight for s in st.strategies)

    shares = [i2v_share(st) for st in pp.stages]
    assert shares == sorted(shares) and shares[-1] > 0.5
    with pytest.raises(ValueError, match=r"curriculum\.stages\[2\].*no step at train\.max_steps=3.*at least 4"):
        MaskSampler(pp, 3)

    for T in (3, 5, 9, 17, 33):
        assert kept(MaskSampler(interpolation_only(), 1).sample(12345, T, gen(T))) == [0, T - 1]
    s = MaskSampler(i2v_finetune(), 1)
    assert len(s.stages) == 1 and s.stages[0].end is None
    positions = {kept(s.sample(10**6, 9, gen(i)))[0] for i in range(100)}
    assert len(positions) > 5


# -----------------------------------------------------------------------------
# validation


def _good_stage(**kw):
    d = {"start": 0.0, "end": None, "strategies": [{"name": "interpolation"}], "mask_ratio": [0.1, 0.9]}
    d.update(kw)
    return d


BAD = [
    ({"stages": [_good_stage(end=0.5), _good_stage(start=0.5, strategies=[{"name": "i2v", "weight": -1.0}])]},
     "curriculum.stages[1].strategies[0].weight must be > 0, got -1.0"),
    ({"stages": [_good_stage(strategies=[{"name": "i2v", "weight": 0.0}])]}, "stages[0].strategies[0].weight"),
    ({"stages": [_good_stage(mask_ratio=[0.0, 0.5])]}, "curriculum.stages[0].mask_ratio"),
    ({"stages": [_good_stage(mask_ratio=[0.5, 1.0])]}, "curriculum.stages[0].mask_ratio"),
    ({"stages": [_good_stage(mask_ratio=[-0.1, 0.5])]}, "curriculum.stages[0].mask_ratio"),
    ({"stages": [_good_stage(mask_ratio=[0.7, 0.3])]}, "curriculum.stages[0].mask_ratio must have min <= max"),
    ({"stages": [_good_stage(mask_ratio=[0.5])]}, "curriculum.stages[0].mask_ratio must be two numbers"),
    ({"stages": [_good_stage(end=0.5), _good_stage(start=0.25)]}, "curriculum.stages[1] overlaps"),
    ({"stages": [_good_stage(end=0.5), _good_stage(start=0.75)]}, "gap before curriculum.stages[1]"),
    ({"stages": [_good_stage(end=0.25), _good_stage(start=0.5, end=0.75),
                 _good_stage(start=0.25, end=0.5)]}, "curriculum.stages must be sorted"),
    ({"stages": [_good_stage(), _good_stage(start=0.5)]}, "curriculum.stages[0].end is null"),
    ({"stages": [_good_stage(start=0.1)]}, "curriculum.stages[0].start must be 0"),
    ({"stages": [_good_stage(end=0.0)]}, "curriculum.stages[0].end must be > start"),
    ({"stages": [_good_stage(end=0.5)]}, "curriculum.stages[0].end=0.5: the last stage must reach the end"),
    ({"stages": [_good_stage(end=1.5)]}, "curriculum.stages[0].end must be a fraction of train.max_steps"),
    ({"stages": [_good_stage(end=100), _good_stage(start=100)]}, "curriculum.stages[0].end must be a fraction"),
    ({"stages": [_good_stage(start=-0.1)]}, "curriculum.stages[0].start must be a fraction of train.max_steps"),
    ({"stages": [{"start_step": 0, "end_step": None, "strategies": ["i2v"]}]},
     "curriculum.stages[0] uses start_step/end_step: stage boundaries are now fractions"),
    ({"stages": [_good_stage(strategies=[{"name": "inpaint"}])]}, "curriculum.stages[0].strategies[0].name"),
    ({"stages": [_good_stage(strategies=[{"name": "i2v", "position": "center"}])]},
     "curriculum.stages[0].strategies[0].position"),
    ({"stages": [_good_stage(strategies=[{"name": "interpolation", "keep_every": -1}])]},
     "curriculum.stages[0].strategies[0].keep_every"),
    ({"stages": [_good_stage(strategies=[])]}, "curriculum.stages[0].strategies"),
    ({"stages": []}, "curriculum.stages"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m for _, m in BAD])
def test_invalid_curricula_raise(data, message):
    with pytest.raises(ValueError) as e:
        curriculum_from_dict(data)
    assert message in str(e.value)


def test_invalid_structured_config_raises_with_key():
    cfg = OmegaConf.structured(CurriculumConfig(stages=[
        stage(0.0, 0.1, [MaskStrategyConfig()]),
        stage(0.1, None, [MaskStrategyConfig(name="i2v"), MaskStrategyConfig(name="random", weight=-2.0)]),
    ]))
    with pytest.raises(ValueError, match=r"curriculum\.stages\[1\]\.strategies\[1\]\.weight must be > 0"):
        MaskSampler(cfg, 100)
    with pytest.raises(ValueError, match=r"curriculum\.stages\[1\]\.strategies\[1\]\.weight"):
        validate_curriculum(cfg)


def test_unknown_key_in_dict_raises():
    with pytest.raises(ValueError, match="mask_ratios"):
        curriculum_from_dict({"stages": [{"start": 0.0, "mask_ratios": [0.1, 0.2]}]})
    with pytest.raises(ValueError, match="weigth"):
        curriculum_from_dict([{"strategies": [{"name": "i2v", "weigth": 2.0}]}])


def test_check_curriculum_reaches_names_a_stage_without_steps():
    pp = paper_curriculum()
    check_curriculum_reaches(pp, 4)
    with pytest.raises(ValueError, match=r"curriculum\.stages\[\d\] \(start=.*\) gets no step at "
                                         r"train\.max_steps=2: raise train\.max_steps \(to at least 4\)"):
        check_curriculum_reaches(pp, 2)
    short = CurriculumConfig(stages=[stage(0.0, 0.99, [MaskStrategyConfig()]),
                                     stage(0.99, None, [MaskStrategyConfig()])])
    check_curriculum_reaches(short, 100)  # the last stage gets step 99
    with pytest.raises(ValueError, match=r"curriculum\.stages\[1\] \(start=0\.99, end=None\) gets no step"):
        check_curriculum_reaches(short, 10)
    with pytest.raises(ValueError, match="train.max_steps must be a positive integer"):
        check_curriculum_reaches(short, 0)


# -----------------------------------------------------------------------------
# OmegaConf structured configs


def test_omegaconf_structured_gives_identical_masks():
    dc = paper_curriculum()
    dc.stages[1].strategies.append(MaskStrategyConfig(name="interpolation", weight=0.3, keep_every=3))
    oc = OmegaConf.structured(dc)
    a, b = MaskSampler(dc, 400), MaskSampler(oc, 400)
    assert isinstance(b.stage_at(0), CurriculumStage)
    for step in (0, 99, 100, 250, 399, 5000):
        for seed in range(50):
            assert torch.equal(a.sample(step, 17, gen(seed)), b.sample(step, 17, gen(seed)))
    # a YAML-like override merged onto the schema works as well
    yaml = OmegaConf.create({"stages": [{"start": 0.0, "end": None,
                                         "strategies": [{"name": "i2v", "position": "last"}]}]})
    merged = OmegaConf.merge(OmegaConf.structured(CurriculumConfig), yaml)
    assert kept(MaskSampler(merged, 10).sample(3, 9, gen(0))) == [8]
    check_curriculum_reaches(oc, 400)


# -----------------------------------------------------------------------------
# inference tasks


def test_task_masks():
    assert kept(task_mask("interpolation", 9)) == [0, 8]
    assert kept(task_mask("interpolation", 9, keep_every=4)) == [0, 4, 8]
    assert kept(task_mask("loop", 5)) == [0, 4]
    assert kept(task_mask("i2v", 9)) == [4]
    assert kept(task_mask("i2v", 9, position="first")) == [0]
    assert kept(task_mask("i2v", 9, position="last")) == [8]
    assert kept(task_mask("i2v", 9, position=3)) == [3]
    assert kept(task_mask("i2v", 9, position=-1)) == [8]
    assert kept(task_mask("expand_forward", 9, num_given=3)) == [0, 1, 2]
    assert kept(task_mask("expand_backward", 9, num_given=2)) == [7, 8]
    assert task_mask("expand_forward", 2).tolist() == [False, True]
    assert task_mask("i2v", 4).dtype == torch.bool
    for bad in [dict(task="interpolation", num_frames=2), dict(task="loop", num_frames=2),
                dict(task="interpolation", num_frames=9, keep_every=1),
                dict(task="i2v", num_frames=9, position="random"), dict(task="i2v", num_frames=9, position=9),
                dict(task="expand_forward", num_frames=9, num_given=9),
                dict(task="expand_backward", num_frames=9, num_given=0),
                dict(task="inpaint", num_frames=9), dict(task="i2v", num_frames=1)]:
        with pytest.raises(ValueError):
            task_mask(**bad)


def test_mask_ratio():
    assert mask_ratio(task_mask("i2v", 4)) == pytest.approx(0.75)
    batch = torch.stack([task_mask("i2v", 4), task_mask("interpolation", 4)])  # [2, 4]
    assert mask_ratio(batch) == pytest.approx(5 / 8)


@pytest.mark.parametrize("name, T", [(name, T) for name in ("interpolation", "expand_forward", "expand_backward")
                                     for T in TS if (name, T) != ("interpolation", 2)])  # 2 frames: a fixed mask
@pytest.mark.parametrize("ratio", RATIOS)
def test_unreachable_ratios_names_exactly_the_masks_that_fall_back(name, T, ratio):
    """A strategy is reported iff make_mask cannot meet the stage's ratio, and the closest ratio it names is the one
    make_mask then trains on."""
    lo, hi = ratio
    curriculum = CurriculumConfig(stages=[CurriculumStage(start=0.0, end=None, strategies=[MaskStrategyConfig(name)],
                                                          mask_ratio=list(ratio))])
    drawn = {mask_ratio(make_mask(MaskStrategyConfig(name), T, mask_generator(s, 0, 0), ratio)) for s in SEEDS}
    problems = unreachable_ratios(curriculum, T)
    met = all(lo - 1e-9 <= r <= hi + 1e-9 for r in drawn)
    assert (problems == []) == met
    if not met:
        assert len(drawn) == 1 and f"it uses the closest, {drawn.pop():.3f}" in problems[0]
        assert problems[0].startswith(f"curriculum.stages[0] {name}: no mask of {T} frames")


def test_unreachable_ratios_ignores_fixed_and_rounded_ratios():
    """i2v and keep_every > 0 ignore mask_ratio by design and random only rounds it: none is a silent fallback."""
    stage = CurriculumStage(start=0.0, end=None, mask_ratio=[0.01, 0.02], strategies=[
        MaskStrategyConfig("i2v"), MaskStrategyConfig("interpolation", keep_every=2), MaskStrategyConfig("random")])
    assert unreachable_ratios(CurriculumConfig(stages=[stage]), 9) == []


def test_the_paper_curriculum_is_reachable_at_its_clip_lengths_but_not_at_five_frames():
    assert unreachable_ratios(paper_curriculum(), 17) == unreachable_ratios(paper_curriculum(), 9) == []
    assert unreachable_ratios(paper_curriculum(), 5) == [
        "curriculum.stages[3] interpolation: no mask of 5 frames has a ratio in mask_ratio=[0.75, 0.95]; "
        "it uses the closest, 0.600"]
