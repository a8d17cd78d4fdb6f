"""Discovery, vLLM-Omni names, vLLM's substring rule and grouping on real diffusers/transformers
models, per component and per target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerscan.errors import UserError
from layerscan.layers import LayerIndex, qualify, split_pattern
from layerscan.profiles import ARCHITECTURES, family_key, make_profile


def index_for(modules: dict, target: str = "vllm-omni==0.30.0", name: str | None = None) -> LayerIndex:
    profile = make_profile(type(modules["transformer"]).__name__, name, target,
                           present=tuple(modules))
    return LayerIndex.discover(modules, profile)


def naming(arch: str):
    return next(a.dit for a in ARCHITECTURES if a.name == arch)


@pytest.fixture(scope="module")
def qwen_dit():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=12, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def qwen(qwen_dit):
    return index_for({"transformer": qwen_dit})


@pytest.fixture(scope="module")
def qwen_pipe(tiny_qwen_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(tiny_qwen_dir), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 6, 6))
    return index_for({"transformer": model})


def test_qualified_patterns_round_trip():
    assert qualify("transformer", "img_mlp") == "img_mlp"
    assert qualify("transformer", "") == "transformer:"
    assert qualify("text_encoder", "layers.3.") == "text_encoder:layers.3."
    assert split_pattern("img_mlp") == ("transformer", "img_mlp")
    assert split_pattern("text_encoder:") == ("text_encoder", "")
    assert split_pattern("transformer_2:ffn") == ("transformer_2", "ffn")


def test_vllm_omni_names_per_architecture():
    qwen = naming("qwen-image")
    assert qwen.engine_name("transformer_blocks.4.attn.to_k") == "transformer_blocks.4.attn.to_qkv"
    assert qwen.engine_name("transformer_blocks.4.attn.add_v_proj") == "transformer_blocks.4.attn.add_kv_proj"
    # vLLM-Omni's Qwen-Image keeps the ".0" of to_out (its prefix is f"{prefix}.to_out.0").
    assert qwen.engine_name("transformer_blocks.4.attn.to_out.0") == "transformer_blocks.4.attn.to_out.0"
    z = naming("z-image")
    assert z.engine_name("layers.3.attention.to_v") == "layers.3.attention.to_qkv"
    assert z.engine_name("layers.3.feed_forward.w3") == "layers.3.feed_forward.w13"
    assert z.engine_name("layers.3.feed_forward.w2") == "layers.3.feed_forward.w2"
    wan = naming("wan")
    assert wan.engine_name("blocks.0.attn1.to_q") == "blocks.0.attn1.to_qkv"
    assert wan.engine_name("blocks.0.attn2.to_q") == "blocks.0.attn2.to_q"  # cross-attention apart
    assert wan.engine_name("blocks.0.attn2.to_out.0") == "blocks.0.attn2.to_out"
    assert wan.engine_name("blocks.0.ffn.net.0.proj") == "blocks.0.ffn.net_0.proj"
    assert wan.engine_name("blocks.0.ffn.net.2") == "blocks.0.ffn.net_2"
    assert family_key("transformer_blocks.4.img_mlp.net.2") == "img_mlp"
    assert family_key("transformer_blocks.4.attn.to_qkv") == "to_qkv"
    assert family_key("layers.4.self_attn.q_proj") == "q_proj"
    assert family_key("model.layers.4.mlp.down_proj") == "down_proj"
    assert family_key("blocks.0.attn2.to_q") == "attn2"
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
        assert sorted(covered) == sorted(l.name for l in qwen.layers)  # a partition
        assert sum(g.params for g in groups) == qwen.quantizable_params
    blocks = qwen.groups("block")
    assert len(blocks) == 12
    block1 = next(g for g in blocks if g.pattern == "transformer_blocks.1.")
    assert all(n.startswith("transformer_blocks.1.") for n in block1.layers)  # not block 10, 11


def test_qwen_image_text_encoder_is_not_quantized_by_vllm_omni_0_30(qwen_pipe):
    modules = {"transformer": qwen_pipe.transformer, "text_encoder": qwen_pipe.text_encoder,
               "vae": qwen_pipe.vae}
    index = index_for(modules)
    assert index.components == ["transformer"]  # 0.30.0 loads Qwen2.5-VL unquantized
    assert index.profile.target_quantizes == ("transformer",)
    with pytest.raises(UserError, match="does not quantize|not text_encoder|names component"):
        index.validate(["text_encoder:layers.0."])


def test_text_encoder_groups_under_vllm_omni_z_image():
    from layerscan.pipeline import load_pipeline
    from layerscan.tiny import tiny_pipeline_dir

    index = load_pipeline(str(tiny_pipeline_dir("tiny-z-image")), "cpu").index
    assert index.components == ["transformer", "text_encoder"]  # no VAE under vllm-omni
    te = index.of("text_encoder")
    depth = len({l.engine_name.split(".")[2] for l in te})
    # Every Linear on its own, named from the causal LM's root as vLLM-Omni builds it.
    assert {l.engine_name for l in te} == {f"model.layers.{i}.{p}" for i in range(depth) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    te_families = [g.pattern for g in index.groups("family") if g.component == "text_encoder"]
    assert te_families == [f"text_encoder:{f}" for f in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    blocks = [g for g in index.groups("family", "block") if g.component == "text_encoder"]
    assert [g.pattern for g in blocks] == [f"text_encoder:model.layers.{i}." for i in range(depth)]
    whole = [g for g in index.groups("family", "component") if g.component == "text_encoder"]
    assert [g.pattern for g in whole] == ["text_encoder:"] and len(whole[0].layers) == 7 * depth
    # A DiT pattern never selects text-encoder layers and vice versa.
    assert all(l.component == "transformer" for l in index.match("to_qkv"))
    assert {l.component for l in index.match("text_encoder:model.layers.1.")} == {"text_encoder"}


def test_seed_target_stores_text_encoder_and_vae_as_whole_components(qwen_pipe):
    modules = {"transformer": qwen_pipe.transformer, "text_encoder": qwen_pipe.text_encoder,
               "vae": qwen_pipe.vae}
    index = index_for(modules, target="seed")
    assert index.profile.match == "substring"
    groups = index.groups("family")
    assert [g.pattern for g in groups if g.component != "transformer"] == ["text_encoder:", "vae:"]
    assert index.method("vae") == "storage"


def test_flux_quantizes_only_single_stream_blocks(flux):
    names = [l.engine_name for l in flux.layers]
    assert names and all(n.startswith("single_transformer_blocks.") for n in names)
    assert {family_key(n) for n in names} == {"to_qkv", "proj_mlp", "proj_out"}


def test_wan_experts_share_names_and_are_separate_components():
    from diffusers import WanTransformer3DModel

    def expert():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
                                     ffn_dim=64, num_layers=2, rope_max_seq_len=32)

    index = index_for({"transformer": expert(), "transformer_2": expert()})
    assert index.components == ["transformer", "transformer_2"]
    first = {l.engine_name for l in index.of("transformer")}
    assert first == {l.engine_name for l in index.of("transformer_2")}
    assert "blocks.1.ffn.net_0.proj" in first and "blocks.1.attn1.to_qkv" in first
    families = [g.pattern for g in index.groups("family")]
    assert families == ["attn1", "attn2", "ffn", "transformer_2:attn1", "transformer_2:attn2",
                        "transformer_2:ffn"]
    assert all(l.component == "transformer_2" for l in index.match("transformer_2:ffn"))


def test_unknown_pattern_lists_nearest_names(qwen):
    with pytest.raises(UserError) as err:
        qwen.validate(["img_mpl"])
    assert "img_mlp" in str(err.value) and "matches no quantizable layer" in str(err.value)
    qwen.validate(["img_mlp", "transformer_blocks.3."])
    with pytest.raises(UserError, match="no quantizable layer; the families are: to_qkv, "):
        qwen.validate(["zzzzzz"])  # nothing close: the user still learns what exists
    with pytest.raises(UserError, match="does not quantize"):
        qwen.validate(["vae:"])


def test_default_profile_for_unknown_architecture():
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
    index = index_for({"transformer": net})
    assert index.profile.name == "default"
    assert [l.engine_name for l in index.layers] == ["blocks.0.proj", "blocks.1.proj"]
    assert index.total_params == 3 * (64 + 8)


def test_unknown_target_and_profile_are_one_line_errors():
    with pytest.raises(UserError, match="unknown target"):
        make_profile("QwenImageTransformer2DModel", target="int4")
    with pytest.raises(UserError, match="unknown architecture profile"):
        make_profile("QwenImageTransformer2DModel", name="nope")
    with pytest.raises(UserError, match="quantizes transformer, text_encoder; not vae"):
        make_profile("ZImageTransformer2DModel", components=("transformer", "vae"))
    with pytest.raises(UserError, match="quantizes transformer; not text_encoder"):
        make_profile("QwenImageTransformer2DModel", components=("transformer", "text_encoder"))
