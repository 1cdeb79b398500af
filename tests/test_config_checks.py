"""Config validation when the config is resolved (dcdit.config_checks): every key has a range, the
cross-key rules agree with what the model constructors really accept, and every problem is one line
naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

from dcdit.config import DCDiTConfig, DiTConfig, RunConfig, build_model, load_run_config
from dcdit.config_checks import ROUTERS, check_batch_split, check_run_config, leaf_values, rules
from dcdit.errors import ConfigError

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
        "train.global_batch_size=4", "train.ratio_batch_size=4"]


def test_every_config_key_has_a_rule_and_every_rule_a_key():
    """A field added to a config dataclass without a range (or a rule left behind by a rename) fails here."""
    keys = {k for model in (DCDiTConfig(), DiTConfig()) for k, _ in leaf_values(RunConfig(model=model))}
    assert keys - set(rules()) == set(), "config keys without a rule in dcdit.config_checks.rules()"
    assert set(rules()) - keys == set(), "rules for keys that no config has"


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "src",
                                                                              "dcdit", "configs")) if f.endswith(".yaml")))
def test_packaged_configs_pass(name):
    """Rules too strict for the paper's own recipes (or the MNIST default) would refuse these."""
    assert isinstance(load_run_config(name), RunConfig)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.steps=0", "train.steps", "0"),
        ("train.steps=-5", "train.steps", "-5"),
        ("train.ckpt_every=0", "train.ckpt_every", "0"),
        ("train.log_every=0", "train.log_every", "0"),
        ("train.ema_decay=2", "train.ema_decay", "2.0"),
        ("train.ema_decay=-0.1", "train.ema_decay", "-0.1"),
        ("train.lr=.inf", "train.lr", "inf"),
        ("train.lr=.nan", "train.lr", "nan"),
        ("train.lr=0", "train.lr", "0.0"),
        ("train.grad_clip=-1", "train.grad_clip", "-1.0"),
        ("train.keep_last=-1", "train.keep_last", "-1"),
        ("train.seed=-1", "train.seed", "-1"),
        ("train.multi_budget.fractions=[0.5,1.5]", "train.multi_budget.fractions", "[0.5, 1.5]"),
        ("train.multi_budget.fractions=[1.0]", "train.multi_budget.fractions", "[1.0]"),
        ("train.multi_budget.fractions=0.5", "train.multi_budget.fractions", "0.5"),
        ("train.multi_budget=3", "train.multi_budget", "3"),
        ("train.dydit_target=0", "train.dydit_target", "0.0"),
        ("model.class_dropout_prob=1.5", "model.class_dropout_prob", "1.5"),
        ("model.class_dropout_prob=1", "model.class_dropout_prob", "1.0"),
        ("model.input_size=abc", "model.input_size", "'abc'"),
        ("model.input_size=[16]", "model.input_size", "(16,)"),
        ("model.input_size=0", "model.input_size", "0"),
        ("model.target_ratio=1", "model.target_ratio", "1.0"),
        ("model.dechunk_sigma=0", "model.dechunk_sigma", "0.0"),
        ("model.dydit_threshold=1", "model.dydit_threshold", "1.0"),
        ("model.timestep_freq_shift=128", "model.timestep_freq_shift", "128.0"),
        ("model.noise_schedule=quadratic", "model.noise_schedule", "'quadratic'"),
        ("model.router=magic", "model.router", "'magic'"),
        ("data.latent_scale=0", "data.latent_scale", "0.0"),
        ("sample.tail_dropping_fraction=1", "sample.tail_dropping_fraction", "1.0"),
        ("sample.num_sampling_steps=1001", "sample.num_sampling_steps", "1001"),
        ("sample.eta=-0.5", "sample.eta", "-0.5"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps", "0"),
        ("model.execution=jagged", "model.execution", "'jagged'"),
        ("model.inner_mlp=true", "model.inner_mlp", "True"),
        ("model.inner_mlp=[1,0,1,1]", "model.inner_mlp", "[1, 0, 1, 1]"),
    ],
)
def test_out_of_range_values_are_refused_naming_key_value_and_range(override, key, value):
    with pytest.raises(ConfigError) as e:
        load_run_config("mnist", [override])
    msg = str(e.value)
    assert f"config key {key} is {value}; it must be " in msg and "\n" not in msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.ema_decay=0", "train.ema_decay=1"],  # [0, 1] is closed
        ["model.class_dropout_prob=0"],
        ["train.multi_budget.fractions=[0,0.999]", "train.multi_budget.start_step=0"],
        ["train.keep_last=0", "train.grad_clip=0", "train.weight_decay=0", "train.ratio_loss_weight=0"],
        ["train.seed=4294967295", "sample.seed=0"],
        ["model.input_size=[16,24]", "model.timestep_freq_shift=1"],
        ["train.ratio_batch_size=32", "train.micro_batch_size=32"],
        ["sample.num_sampling_steps=1000", "sample.sampler=ddpm"],
        ["sample.num_sampling_steps=250", "sample.sampler=ddim"],
        ["sample.sampler=ddim", "sample.eta=1.0", "train.max_nonfinite_steps=1", "model.execution=padded"],
        ["model.inner_mlp=[false,false,false,false]"],  # every block attention-only
        ["model.inner_mlp=[true,true,true,true]", "model.dydit=true"],  # no block without MLP: DyDiT is fine
    ],
)
def test_values_on_the_boundary_are_accepted(overrides):
    """Off-by-one bounds (open where closed is meant) would refuse these."""
    load_run_config("mnist", overrides)


def test_all_problems_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_run_config("mnist", ["train.steps=0", "train.lr=.inf", "model.class_dropout_prob=1.5"])
    msg = str(e.value)
    assert "\n" not in msg and msg.count("config key") == 3
    assert "train.steps is 0" in msg and "train.lr is inf" in msg and "model.class_dropout_prob is 1.5" in msg


@pytest.mark.parametrize(
    "overrides, key, needs",
    [
        (["train.micro_batch_size=5"], "train.micro_batch_size", "divide train.global_batch_size (32)"),
        (["train.ratio_batch_size=5"], "train.ratio_batch_size", "divide train.global_batch_size (32)"),
        (["train.micro_batch_size=8", "train.ratio_batch_size=16"], "train.ratio_batch_size",
         "divide train.micro_batch_size (8)"),
        (["train.upcycle.distill_steps=10"], "train.upcycle.distill_steps", "train.upcycle.from_dit"),
        (["train.dydit_router_lr=0.01"], "train.dydit_router_lr", "model.dydit is true"),
        (["data.name=latents", "data.root=null"], "data.root", "dcdit extract-features"),
        (["sample.guidance_channels=3"], "sample.guidance_channels", "model.in_channels (1)"),
        (["sample.sampler=ddim", "sample.num_sampling_steps=300"], "sample.num_sampling_steps", "integer stride"),
        (["sample.sampler=ddpm", "sample.eta=1.0"], "sample.eta", "sample.sampler is ddim"),
        (["model.inner_mlp=[true,false]"], "model.inner_mlp", "one entry per inner block (model.depth = 4)"),
        (["model.inner_mlp=[true,false,true,true]", "model.dydit=true"], "model.inner_mlp", "model.dydit"),
        (["model.inner_mlp=[true,false,true,true]", "train.upcycle.from_dit=dit.pt"], "model.inner_mlp",
         "train.upcycle.from_dit"),
    ],
)
def test_inconsistent_settings_are_refused(overrides, key, needs):
    """Settings that are each in range but make the run silently different from what was asked."""
    with pytest.raises(ConfigError) as e:
        load_run_config("mnist", overrides)
    assert f"config key {key} is " in str(e.value) and needs in str(e.value)


def test_dit_refuses_dcdit_only_features():
    with pytest.raises(ConfigError, match="train.multi_budget.fractions"):
        load_run_config("DiT-B-2", ["train.multi_budget.fractions=[0.2]"])
    with pytest.raises(ConfigError, match="sample.tail_dropping_fraction"):
        load_run_config("DiT-B-2", ["sample.tail_dropping_fraction=0.2"])
    with pytest.raises(ConfigError, match="model.patch_size is 3; it must divide both sides"):
        load_run_config("DiT-B-2", ["model.patch_size=3"])
    with pytest.raises(ConfigError, match="train.upcycle.from_dit"):
        load_run_config("DiT-B-2", ["train.upcycle.from_dit=x.pt"])
    load_run_config("DiT-B-2", ["train.ratio_batch_size=3"])  # no router, no ratio loss: any group size


def _builds(model_cfg) -> bool:
    try:
        with torch.device("meta"):
            build_model(model_cfg)
        return True
    except ValueError:
        return False


def _passes(model_cfg) -> bool:
    try:
        check_run_config(RunConfig(model=model_cfg))
        return True
    except ConfigError:
        return False


def test_width_rules_agree_with_the_dcdit_constructor():
    """Brute force over widths, heads, GroupNorm groups, encoder widths and routers: the config check
    accepts exactly the DC-DiTs the model code can build (too loose: a crash later; too strict: a
    valid model refused)."""
    cases = itertools.product((32, 48, 90, 96), (2, 3, 5), (4, 8, 12), (None, 12, 24), ("cosine", "predictability"),
                              (False, True))
    disagree = []
    for D, heads, groups, width, router, dydit in cases:
        cfg = DCDiTConfig(input_size=8, in_channels=1, hidden_size=D, depth=1, num_heads=heads, num_classes=10,
                          conv_norm_groups=groups, encoder_width=width, router=router, dydit=dydit)
        if _builds(cfg) != _passes(cfg):
            disagree.append((D, heads, groups, width, router, dydit, _builds(cfg)))
    assert not disagree, disagree[:10]


def test_inner_mlp_rules_agree_with_the_dcdit_constructor():
    """Brute force over depths, per-block MLP flags (lists of every length up to 3, null) and DyDiT: the
    config check accepts exactly the DC-DiTs the model code builds."""
    flags = [None] + [list(f) for n in range(4) for f in itertools.product((True, False), repeat=n)]
    disagree = []
    for depth, inner_mlp, dydit in itertools.product((1, 2, 3), flags, (False, True)):
        cfg = DCDiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
                          conv_norm_groups=8, inner_mlp=inner_mlp, dydit=dydit)
        if _builds(cfg) != _passes(cfg):
            disagree.append((depth, inner_mlp, dydit, _builds(cfg)))
    assert not disagree, disagree[:10]
    assert _passes(DCDiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                               conv_norm_groups=8, inner_mlp=[False, True]))


def test_patch_and_mlp_rules_agree_with_the_dit_constructor():
    disagree = []
    for size, patch, D, heads, mlp in itertools.product((8, 12, (8, 12)), (1, 2, 3, 4), (32, 36), (2, 3, 4), (4.0, 1.5)):
        cfg = DiTConfig(input_size=size, patch_size=patch, in_channels=1, hidden_size=D, depth=1, num_heads=heads,
                        num_classes=10, mlp_ratio=mlp)
        if _builds(cfg) != _passes(cfg):
            disagree.append((size, patch, D, heads, mlp, _builds(cfg)))
    assert not disagree, disagree[:10]


def test_timestep_shift_bound_is_where_the_embedding_breaks():
    """The embedder divides by (128 − shift): at 128 its output is NaN, just below it is finite."""
    from dcdit.models.embedders import TimestepEmbedder

    t = torch.arange(0, 1000, 111)
    for shift, finite in ((128.0, False), (127.0, True)):
        emb = TimestepEmbedder(8, downscale_freq_shift=shift)(t)
        assert bool(torch.isfinite(emb).all()) == finite
        assert _passes(DCDiTConfig(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                                   conv_norm_groups=8, timestep_freq_shift=shift)) == finite


def test_router_names_match_build_router():
    from dcdit.models.router import build_router

    for name in ROUTERS:
        build_router(name, 32, 4.0)
    with pytest.raises(ValueError) as e:
        build_router("nope", 32, 4.0)
    assert str(sorted(ROUTERS)) in str(e.value)


def test_batch_split_by_brute_force():
    """check_batch_split(cfg, world) succeeds iff some accumulation count a has world × micro × a = global,
    and then returns (micro, a); a DC-DiT's ratio groups must also fill each micro-batch."""
    base = load_run_config("mnist")
    for G, world, micro, ratio in itertools.product(range(1, 13), range(1, 5), (None, 1, 2, 3, 4, 6), (1, 2, 4)):
        train = dataclasses.replace(base.train, global_batch_size=G, micro_batch_size=micro, ratio_batch_size=ratio)
        cfg = dataclasses.replace(base, train=train)
        m = micro or G // world
        fits = [a for a in range(1, G + 1) if world * m * a == G] if m >= 1 else []
        if fits and m % ratio == 0:
            assert check_batch_split(cfg, world) == (m, fits[0])
        else:
            with pytest.raises(ConfigError, match="ratio_batch_size" if fits else "global_batch_size"):
                check_batch_split(cfg, world)


def test_config_file_must_be_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=r"config file .*list.yaml must be a YAML mapping"):
        load_run_config(tmp_path / "list.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(ConfigError, match=r"bin.yaml is not a text \(YAML\) file"):
        load_run_config(tmp_path / "bin.yaml")


def test_tiny_test_configs_pass():
    """The overrides the CLI and training tests use."""
    load_run_config("mnist", TINY)


def test_the_shipped_demo_model_config_passes():
    """The config inside the shipped checkpoint (read as written) satisfies every rule."""
    from dcdit.checkpoint import read_weights
    from dcdit.cli import DEMO_CHECKPOINT

    check_run_config(read_weights(DEMO_CHECKPOINT)[1])
