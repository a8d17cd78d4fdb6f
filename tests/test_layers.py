"""Discovery, name mapping, vLLM's substring rule and grouping on real diffusers transformers."""

from __future__ import annotations

import pytest
import torch

from layerscan.errors import UserError
from layerscan.layers import (
    DEFAULT_PROFILE,
    LayerIndex,
    engine_name,
    family_key,
    is_layer_skipped,
    profile_for,
)


@pytest.fixture(scope="module")
def qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=12, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    return LayerIndex.discover(model, profile_for(model))


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6))
    return LayerIndex.discover(model, profile_for(model))


def test_substring_rule_consequences():
    assert is_layer_skipped("transformer_blocks.3.attn.to_out", ["to_out"])
    assert not is_layer_skipped("transformer_blocks.3.attn.to_add_out", ["to_out"])
    assert is_layer_skipped("transformer_blocks.1.img_mlp.net.2", ["transformer_blocks.1."])
    assert not is_layer_skipped("transformer_blocks.10.img_mlp.net.2", ["transformer_blocks.1."])
    assert is_layer_skipped("transformer_blocks.0.attn.add_kv_proj", ["attn"])
    assert not is_layer_skipped("transformer_blocks.0.attn.to_qkv", [])


def test_name_mapping_fuses_shards():
    assert engine_name("transformer_blocks.4.attn.to_k") == "transformer_blocks.4.attn.to_qkv"
    assert engine_name("transformer_blocks.4.attn.add_v_proj") == "transformer_blocks.4.attn.add_kv_proj"
    assert engine_name("transformer_blocks.4.attn.to_out.0") == "transformer_blocks.4.attn.to_out"
    assert engine_name("transformer_blocks.4.img_mlp.net.0.proj") == "transformer_blocks.4.img_mlp.net.0.proj"
    assert family_key("transformer_blocks.4.img_mlp.net.2") == "img_mlp"
    assert family_key("transformer_blocks.4.attn.to_qkv") == "to_qkv"
    assert family_key("proj_out") is None


def test_qwen_profile_quantizes_exactly_the_six_families(qwen):
    assert qwen.profile.name == "qwen-image"
    families = [g.pattern for g in qwen.groups("family")]
    assert sorted(families) == sorted(
        ["to_qkv", "add_kv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp"])
    names = {layer.engine_name for layer in qwen.layers}
    assert not any("img_mod" in n or "txt_mod" in n or n == "proj_out" for n in names)
    # 12 blocks x (to_qkv, add_kv_proj, to_out, to_add_out, 2 img_mlp, 2 txt_mlp)
    assert len(qwen.layers) == 12 * 8
    qkv = next(l for l in qwen.layers if l.engine_name == "transformer_blocks.0.attn.to_qkv")
    assert len(qkv.modules) == 3 and qkv.shape == (3 * 32, 32)
    assert qkv.params == 3 * (32 * 32 + 32)


def test_groups_cover_layers_and_params(qwen):
    for granularity in ("family", "block", "module"):
        groups = qwen.groups(granularity)
        covered = [name for g in groups for name in g.layers]
        assert sorted(covered) == sorted(l.engine_name for l in qwen.layers)  # a partition
        assert sum(g.params for g in groups) == qwen.quantizable_params
    blocks = qwen.groups("block")
    assert len(blocks) == 12
    block1 = next(g for g in blocks if g.pattern == "transformer_blocks.1.")
    assert all(n.startswith("transformer_blocks.1.") for n in block1.layers)  # not block 10, 11


def test_family_patterns_are_exact_under_substring_matching(flux):
    patterns = {g.pattern: set(g.layers) for g in flux.groups("family")}
    # "ff" would also match "ff_context"; the chosen pattern must select the family alone.
    ff = next(p for p in patterns if p.strip(".") == "ff")
    assert all(".ff." in n for n in patterns[ff])
    assert flux.skipped([ff]) == patterns[ff]
    assert any("ff_context" in p for p in patterns)
    # to_qkv spans the double and the single blocks: one family, one pattern.
    assert any(n.startswith("single_transformer_blocks") for n in patterns["to_qkv"])


def test_unknown_pattern_lists_nearest_names(qwen):
    with pytest.raises(UserError) as err:
        qwen.validate(["img_mpl"])
    assert "img_mlp" in str(err.value) and "matches no quantizable layer" in str(err.value)
    qwen.validate(["img_mlp", "transformer_blocks.3."])
    with pytest.raises(UserError, match="no quantizable layer; the families are: to_qkv, "):
        qwen.validate(["zzzzzz"])  # nothing close: the user still learns what exists


def test_default_profile_for_unknown_architecture():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([Block(), Block()])

    net = Net()
    profile = profile_for(net)
    assert profile is DEFAULT_PROFILE
    index = LayerIndex.discover(net, profile)
    assert [l.engine_name for l in index.layers] == ["blocks.0.proj", "blocks.1.proj"]
    assert index.total_params == 3 * (64 + 8)
