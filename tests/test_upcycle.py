"""Upcycling a pretrained DiT into DC-DiT: loading, block copy, frozen embedders, distillation, positions."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.cli import main
from dcdit.config import load_run_config, model_config_from_dict
from dcdit.diffusion import create_diffusion
from dcdit.models.dit import DiT
from dcdit.upcycle import distillation_loss, freeze_embedders, load_pretrained_dit, patch_index_of_tokens, upcycle

DIT_KW = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
DC = dict(arch="dcdit", input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
          encoder_width=16, conv_norm_groups=8)


def random_dit(seed=0, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**{**DIT_KW, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.2)
    return model.eval()


def inputs(n=3, seed=1, grid=(8, 8), C=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, *grid, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_official_layout_checkpoint_loads_and_reproduces(tmp_path):
    src = random_dit()
    torch.save({"model": {k: v * 0 for k, v in src.state_dict().items()}, "ema": src.state_dict()}, tmp_path / "dit.pt")
    model, report = load_pretrained_dit(tmp_path / "dit.pt", num_heads=2)
    assert report.format == "official DiT" and not report.missing and not report.unexpected
    assert len(report.mapped) == len(src.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), src(x, t, y))  # the EMA weights, bit for bit


def test_a_dit_trained_by_dcdit_loads_from_its_run_folder(tmp_path):
    """Upcycling our own DiT baseline: the run folder's latest EMA weights, with its config."""
    from dcdit.checkpoint import save_weights
    from dcdit.config import RunConfig

    src = random_dit(seed=3)
    cfg = RunConfig(model=model_config_from_dict({"arch": "dit", **DIT_KW}))
    ckpt = tmp_path / "run" / "checkpoints" / "0000007"
    ckpt.mkdir(parents=True)
    save_weights(ckpt / "ema.safetensors", src.state_dict(), cfg, step=7)
    save_weights(ckpt / "model.safetensors", {k: v * 0 for k, v in src.state_dict().items()}, cfg, step=7)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("0000007")
    model, report = load_pretrained_dit(tmp_path / "run")
    assert report.format == "dcdit run" and report.config["num_heads"] == DIT_KW["num_heads"]
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), src(x, t, y))


def test_diffusers_layout_loads_and_reproduces_the_source(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:  # diffusers stores one embedder copy per block; tie them
            block.norm1.emb.load_state_dict(emb0)
    ref.eval().save_pretrained(tmp_path / "hf")
    model, report = load_pretrained_dit(tmp_path / "hf")
    assert report.format == "diffusers" and model.t_embedder.downscale_freq_shift == 1.0
    assert any("timestep" in n for n in report.notes)
    x, t, y = inputs(C=4)
    with torch.no_grad():
        expected = ref(hidden_states=x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model.eval()(x, t, y), expected, atol=1e-5, rtol=1e-5)


def test_upcycled_model_has_the_source_blocks_and_frozen_embedders():
    dit = random_dit()
    model, cfg = upcycle(dit, model_config_from_dict(DC))
    sd, src = model.state_dict(), dit.state_dict()
    for k in src:
        if k.startswith(("blocks.", "t_embedder.", "y_embedder.")):
            assert torch.equal(sd[k], src[k]), k
    assert cfg.cond_adaptor and isinstance(model.encoder.cond_norm, nn.LayerNorm) and isinstance(model.decoder.cond_norm, nn.LayerNorm)
    frozen = freeze_embedders(model)
    assert frozen and all(n.startswith(("t_embedder.", "y_embedder.")) for n in frozen)
    # one training step's gradient: none for the embedders, some for the adaptor and the new modules
    with torch.no_grad():  # make the zero-initialised output layers live so gradients reach upstream
        for lin in (model.final_layer.linear, model.final_layer.adaLN_modulation[-1]):
            lin.weight.normal_(0, 0.05)
    x, t, y = inputs()
    terms = create_diffusion("").training_losses(model.train(), x, t, dict(y=y))
    terms["loss"].mean().backward()
    named = dict(model.named_parameters())
    assert all(named[n].grad is None for n in frozen)
    assert named["encoder.cond_norm.weight"].grad.abs().sum() > 0 and named["decoder.cond_norm.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("change, word", [({"hidden_size": 64, "num_heads": 4}, "hidden_size"), ({"depth": 3}, "depth"),
                                          ({"num_heads": 4}, "num_heads"), ({"num_classes": 7}, "num_classes"),
                                          ({"inner_mlp": [False, True]}, "model.inner_mlp")])  # every DiT block has an MLP
def test_a_mismatched_dit_is_refused_naming_the_difference(change, word):
    with pytest.raises(ValueError, match=word):
        upcycle(random_dit(), model_config_from_dict({**DC, **change}))


def test_positions_sit_at_patch_centres():
    """Token (r, c) carries the DiT code of ((r - 1/2)/2, (c - 1/2)/2); for P = 1 it is DiT's table itself."""
    model, cfg = upcycle(random_dit(), model_config_from_dict(DC))
    D, W = 32, 8
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))

    def code(row, col):  # MAE/DiT layout written out: [sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]
        return np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])

    for r, c in ((0, 0), (3, 5), (7, 2)):
        np.testing.assert_allclose(model.pos_embed[0, r * W + c].numpy(), code((r - 0.5) / 2, (c - 0.5) / 2), atol=1e-6)
    # the four pixels of patch (i, j) average to the patch's own coordinate
    i, j = 2, 1
    rows = [((2 * i + a) - cfg.pos_offset) * cfg.pos_scale for a in (0, 1)]
    assert np.mean(rows) == i and np.mean([((2 * j + b) - cfg.pos_offset) * cfg.pos_scale for b in (0, 1)]) == j
    dit1 = random_dit(patch_size=1)
    model1, _ = upcycle(dit1, model_config_from_dict(DC))
    torch.testing.assert_close(model1.pos_embed, dit1.pos_embed)


def test_patch_pairing_is_the_containing_patch():
    idx = torch.tensor([[0, 1, 8, 9, 10, 63]])  # pixels (0,0) (0,1) (1,0) (1,1) (1,2) (7,7) on an 8×8 grid
    assert patch_index_of_tokens(idx, (8, 8), 2).tolist() == [[0, 0, 0, 0, 1, 15]]


def test_distillation_loss_falls_and_starts_where_the_copies_agree():
    torch.manual_seed(0)
    dit = random_dit()
    model, _ = upcycle(dit, model_config_from_dict(DC))
    freeze_embedders(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, t, y = inputs(4)
    losses = []
    for _ in range(60):
        loss, record = distillation_loss(model.train(), dit, x, t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    # the loss is the MSE of paired tokens: check it against a direct computation for the last state, with
    # the student's block outputs packed (T, D) and padded (B, M, D); both executions give the same loss
    # (eval mode: no random label dropout between the calls)
    model.eval()
    got = {}
    for execution in ("packed", "padded"):
        model.execution = execution
        outs_s, outs_t = [], []
        hs = [b.register_forward_hook(lambda m, a, o: outs_s.append(o)) for b in model.blocks]
        ht = [b.register_forward_hook(lambda m, a, o: outs_t.append(o)) for b in dit.blocks]
        with torch.no_grad():
            dit(x, t, y)
            _, rec = model(x, t, y)
            got[execution], _ = distillation_loss(model, dit, x, t, y)
        for h in hs + ht:
            h.remove()
        start = [0, *rec.kept_count.cumsum(0).tolist()]  # packed row of sample b's first token
        brute = []
        for zs, zt in zip(outs_s, outs_t[:2]):
            errs = []
            for b in range(4):
                for m in range(int(rec.kept_count[b])):
                    pix = int(rec.kept_idx[b, m])
                    patch = (pix // 8 // 2) * 4 + (pix % 8) // 2
                    student = zs[b, m] if execution == "padded" else zs[start[b] + m]
                    errs.append(((student - zt[b, patch]) ** 2).mean())
            brute.append(torch.stack(errs).mean())
        torch.testing.assert_close(got[execution], torch.stack(brute).mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["packed"], got["padded"], atol=1e-6, rtol=1e-5)


def test_train_with_upcycling_and_distillation(tmp_path):
    dit = random_dit(input_size=32, in_channels=1, hidden_size=32, depth=1, num_heads=2)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    args = ["train", "mnist", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
            "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=1", "train.ckpt_every=2",
            "train.tensorboard=false", f"train.upcycle.from_dit={tmp_path / 'dit.pt'}", "train.upcycle.num_heads=2",
            "train.upcycle.distill_steps=2", "--no-progress"]
    assert main([*args, "train.steps=2", "--out", str(tmp_path / "run")]) == 0
    assert main([*args, "train.steps=4", "--out", str(tmp_path / "run"), "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    distill = [float(r["distill_loss"]) for r in rows]
    assert distill[0] > 0 and distill[1] > 0 and distill[2:] == [0.0, 0.0]
    assert float(rows[-1]["mse"]) > 0  # the diffusion objective took over
    saved = load_run_config(tmp_path / "run" / "config.yaml")
    assert saved.model.cond_adaptor and saved.model.pos_scale == 0.5
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "run" / "checkpoints" / "0000004" / "model.safetensors"))
    assert torch.equal(final["t_embedder.mlp.0.weight"], dit.state_dict()["t_embedder.mlp.0.weight"])  # frozen
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], dit.state_dict()["blocks.0.attn.qkv.weight"])  # trained


def test_upcycle_command_reports_and_writes(tmp_path, capsys):
    dit = random_dit(input_size=32, hidden_size=32, depth=1, num_heads=2)
    torch.save({"ema": dit.state_dict()}, tmp_path / "dit.pt")
    out = tmp_path / "up.safetensors"
    assert main(["upcycle", "mnist", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
                 "--dit", str(tmp_path / "dit.pt"), "--num-heads", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 missing, 0 unexpected" in text and "frozen" in text and out.exists()
    assert main(["upcycle", "mnist", "--dit", str(tmp_path / "dit.pt"), "--num-heads", "2"]) == 2  # mnist width is 96
    assert "hidden_size" in capsys.readouterr().err


def test_upcycling_returns_a_new_config_and_leaves_the_callers_alone(tmp_path):
    """build_or_upcycle / upcycle_run_config hand back the upcycled model config (condition adaptor,
    DiT patch positions, the DiT's timestep convention) and never write it into the config passed in."""
    import copy

    from dcdit.train import build_or_upcycle
    from dcdit.upcycle import upcycle_run_config

    dit = random_dit(input_size=32, in_channels=1, hidden_size=32, depth=1, num_heads=2)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    cfg = load_run_config("mnist", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
                                    f"train.upcycle.from_dit={tmp_path / 'dit.pt'}", "train.upcycle.num_heads=2"])
    before = copy.deepcopy(cfg)
    for fresh in (True, False):
        model, teacher, model_cfg = build_or_upcycle(cfg, fresh=fresh)
        assert model_cfg.cond_adaptor and model_cfg.pos_scale == 0.5 and model_cfg.pos_offset == 0.5
        assert isinstance(model.encoder.cond_norm, nn.LayerNorm)  # the model is built from the returned config
        assert teacher is not None and not teacher.training
    run = upcycle_run_config(cfg, tmp_path / "dit.pt", num_heads=2)
    assert run.cfg.model.cond_adaptor and run.cfg.train.upcycle.from_dit == str(tmp_path / "dit.pt")
    assert cfg == before  # nothing written into the caller's config
