"""`convert-proxyv`: a tiny checkpoint in the official ProxyV layout (names, shapes and config keys of
penghao-wu/ProxyV's llava_arch.py / vision_mlp.py) converts into a LLaVA-NeXT model and an adapter
whose ProxyV layers compute what the official VisionMLP / ProxyInitializer compute."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lmmsqueeze
from lmmsqueeze.cli import app
from lmmsqueeze.testing import tiny_llava_next, tiny_next_inputs

TOWER = "model.vision_tower.vision_tower.vision_model."
HIDDEN, WIDTH, START, FACTOR = 64, 32, 2, 2  # width: hidden // 2 below 1024; 4 layers, ProxyV from layer 2
PER_CROP = 16  # 32 px crops / patch 8 = a 4x4 grid
PROXIES = PER_CROP // FACTOR ** 2  # 4 per crop
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
             "pad_token_id")


def official_checkpoint(root, learn_proxy: bool, tokenizer: bool = True, tower: str = "local"):
    """Write the tiny LLaVA-NeXT as the official code saves it; returns (tiny model, official tensors)."""
    model, processor = tiny_llava_next(layers=4)
    renames = [("model.vision_tower.", TOWER), ("model.language_model.", "model."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")]
    weights = {}
    for name, tensor in model.state_dict().items():
        new = next((n + name[len(o):] for o, n in renames if name.startswith(o)), name)
        weights[new] = tensor.clone()
    g = torch.Generator().manual_seed(1)

    def rand(*shape, mean=0.0):
        return torch.randn(shape, generator=g) * 0.3 + mean

    # official VisionMLP: context_proj, input_proj, proj = (Linear, SiLU, Linear), layernorm_post (RMSNorm)
    shapes = {"context_proj": (WIDTH, HIDDEN), "input_proj": (WIDTH, HIDDEN), "proj.0": (WIDTH, 2 * WIDTH),
              "proj.2": (HIDDEN, WIDTH), "layernorm_post": (HIDDEN,)}
    for i in range(4 - START):
        weights |= {f"model.vision_mlp_layers.{i}.{k}.weight": rand(*shape, mean=float(k == "layernorm_post"))
                    for k, shape in shapes.items()}
    if learn_proxy:
        weights |= {"model.proxyv_initializer.Wk.weight": rand(WIDTH, HIDDEN),
                    "model.proxyv_initializer.proxyv_tokens": rand(PROXIES, WIDTH)}
    save_file(weights, str(root / "model.safetensors"))
    text = model.config.text_config
    if tower == "local":
        model.config.vision_config.save_pretrained(root / "clip")
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
        **{k: getattr(text, k) for k in TEXT_KEYS},
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "mm_vision_tower": str(root / "clip") if tower == "local" else tower, "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres", "use_mm_proj": True,
        "image_grid_pinpoints": "[(32, 32), (64, 32), (32, 64), (64, 64)]",  # (width, height), officially
        "proxyv": True, "proxyv_start_layer": START, "proxyv_reduce_factor": FACTOR,
        "learn_proxy": learn_proxy, "per_crop_token_len": PER_CROP, "max_num_image_crops": 5,
        "hidden_size_reduce_factor": 2,
    }
    (root / "config.json").write_text(json.dumps(config))
    if tokenizer:
        processor.tokenizer.save_pretrained(root)
    return model, weights


def convert(src, out):
    return CliRunner().invoke(app, ["convert-proxyv", str(src), str(out)])


def official_update(mlp: dict, x, new_proxies, learn_proxy: bool, splat, eps: float):
    """The official VisionMLP on one ProxyV layer, crop by crop (2 crops of 4x4 tokens, 2x2 proxies each)."""
    if learn_proxy:  # splat the proxies with the initializer's attention, then project
        guidance = (splat @ new_proxies.view(2, PROXIES, -1)) @ mlp["context_proj.weight"].T
    else:  # project the proxy grid, then nearest-upsample it by the factor
        side = 4 // FACTOR
        small = (new_proxies @ mlp["context_proj.weight"].T).view(2, side, side, -1)
        guidance = small.repeat_interleave(FACTOR, 1).repeat_interleave(FACTOR, 2)
    x = x.view(2, PER_CROP, -1)
    fused = torch.cat([x @ mlp["input_proj.weight"].T, guidance.reshape(2, PER_CROP, -1)], -1)
    y = F.silu(fused @ mlp["proj.0.weight"].T) @ mlp["proj.2.weight"].T + x
    out = mlp["layernorm_post.weight"] * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))
    return out.reshape(2 * PER_CROP, -1)


@pytest.mark.parametrize("learn_proxy", [False, True])
def test_converted_checkpoint_is_the_original_and_its_proxyv_layers_are_the_official_computation(tmp_path,
                                                                                                   learn_proxy):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    src = tmp_path / "src"
    src.mkdir()
    tiny, official = official_checkpoint(src, learn_proxy)
    result = convert(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out" / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out" / "model")
    ours, theirs = model.state_dict(), tiny.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.config.image_grid_pinpoints == tiny.config.image_grid_pinpoints  # (h, w) from (w, h)
    assert model.config.vision_config.to_dict() | {"dtype": None} == tiny.config.vision_config.to_dict()
    assert model.config.image_token_index == 4 and model.config.vision_feature_layer == -2
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}]
    prompt = processor.apply_chat_template(message, add_generation_prompt=True)
    assert prompt.endswith("questions. USER: <image>\nwhat ? ASSISTANT:") and "Vicuna v1" in result.stderr

    adapter_dir = tmp_path / "out" / "adapter"
    adapter = load_file(str(adapter_dir / "adapter.safetensors"))
    names = {"context_proj": "context_proj", "input_proj": "input_proj", "proj.0": "fuse",
             "proj.2": "out_proj", "layernorm_post": "norm"}
    expected = {f"mlps.{i}.{ours_}.weight": official[f"model.vision_mlp_layers.{i}.{theirs_}.weight"]
                for i in range(4 - START) for theirs_, ours_ in names.items()}
    if learn_proxy:
        expected |= {"initializer.key.weight": official["model.proxyv_initializer.Wk.weight"],
                     "initializer.queries": official["model.proxyv_initializer.proxyv_tokens"]}
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    variant = "nonspatial" if learn_proxy else "spatial"
    pipeline = f"proxyv(factor=2, layer=2, mlp_hidden=0, proxies=4, variant={variant})"
    assert config["pipeline"] == pipeline and pipeline in result.stdout
    assert (config["layer"], config["width"], config["num_layers"]) == (START, WIDTH, 4)

    # a square 32 px image: a 4x4 base crop, then one 4x4 sub-crop with a newline after each row. Nothing
    # is unpadded and each crop is one grid, so the official crop-by-crop computation applies as it is.
    inputs = tiny_next_inputs(processor, sizes=((32, 32),))
    slots = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index).flatten()
    assert slots.numel() == 16 + 4 * 5
    rows = torch.cat([slots[:16], slots[16:].view(4, 5)[:, :4].flatten()])  # official crop order, no newlines
    lm = model.model.language_model
    seen: dict = {}

    def keep(key, fn):
        return lambda module, args, *rest: seen.__setitem__(key, fn(args, rest))

    with torch.no_grad(), lmmsqueeze.apply(model, pipeline, weights=str(adapter_dir)):
        handles = []
        for i in range(START, 4):
            inner = lm.layers[i].inner
            handles += [
                lm.layers[i].register_forward_pre_hook(
                    keep(("in", i), lambda a, r: a[0] if a else r[0]["hidden_states"]), with_kwargs=True),
                lm.layers[i].register_forward_hook(keep(("out", i), lambda a, r: r[-1])),
                # the layer normalises the sequence, then the proxies: the last input is the proxies
                inner.input_layernorm.register_forward_pre_hook(keep(("proxies", i), lambda a, r: a[0])),
                inner.post_attention_layernorm.register_forward_pre_hook(keep(("h", i), lambda a, r: a[0])),
                inner.mlp.register_forward_hook(keep(("ffn", i), lambda a, r: r[-1])),
            ]
        model(**inputs)
        for h in handles:
            h.remove()

        eps = model.config.text_config.rms_norm_eps
        p = 2 * PROXIES  # 2 crops
        x0 = seen["in", START][0, rows].view(2, 4, 4, HIDDEN)  # image tokens entering the first ProxyV layer
        if learn_proxy:  # official ProxyInitializer: Q = proxyv_tokens, K = Wk x, V = x, per crop
            keys = x0.view(2, PER_CROP, HIDDEN) @ official["model.proxyv_initializer.Wk.weight"].T
            logits = official["model.proxyv_initializer.proxyv_tokens"] @ keys.transpose(1, 2) / WIDTH ** 0.5
            proxies = (logits.softmax(-1) @ x0.view(2, PER_CROP, HIDDEN)).reshape(p, HIDDEN)
            splat = logits.transpose(1, 2).softmax(-1)
        else:  # official get_image_proxy: bilinear resize of each crop's grid by the factor
            grid = F.interpolate(x0.permute(0, 3, 1, 2), size=(2, 2), mode="bilinear", align_corners=False)
            proxies, splat = grid.permute(0, 2, 3, 1).reshape(p, HIDDEN), None
        assert torch.allclose(seen["proxies", START][0], proxies, atol=1e-5)
        for i in range(START, 4):
            new_proxies = (seen["h", i] + seen["ffn", i])[0, :p]  # queries: the proxies first
            mlp = {k[len(f"model.vision_mlp_layers.{i - START}."):]: v for k, v in official.items()
                   if k.startswith(f"model.vision_mlp_layers.{i - START}.")}
            want = official_update(mlp, seen["in", i][0, rows], new_proxies, learn_proxy, splat, eps)
            got = seen["out", i][0, rows]
            assert torch.allclose(got, want, atol=1e-5), (i, (got - want).abs().max())


def test_without_tokenizer_or_tower_config_the_model_alone_is_written_and_said(tmp_path):
    from transformers import LlavaNextConfig

    src = tmp_path / "src"
    src.mkdir()
    official_checkpoint(src, learn_proxy=False, tokenizer=False, tower="tiny/clip-not-downloaded")
    result = convert(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "no tokenizer" in result.stderr and "read off the weights" in result.stderr
    config = LlavaNextConfig.from_pretrained(tmp_path / "out" / "model")
    vision = config.vision_config
    shape = (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size)
    assert shape == (32, 2, 8, 32)
    assert config.image_token_index == 47 == config.text_config.vocab_size - 1  # a row after the 47 tokens
    assert not (tmp_path / "out" / "model" / "tokenizer.json").exists()


@pytest.mark.parametrize("damage, message", [
    ("plain", "is not a ProxyV checkpoint"),
    ("missing", ("lacks 1 ProxyV weight(s) its config.json implies, e.g. "
                "'model.vision_mlp_layers.1.proj.2.weight'")),
    ("shape", ("shape mismatch: 'model.layers.0.mlp.down_proj.weight' is (64, 128) in the checkpoint, its "
              "config.json implies (64, 96)")),
])
def test_bad_sources_are_refused_in_one_line(tmp_path, damage, message):
    src = tmp_path / "src"
    src.mkdir()
    if damage == "plain":  # a LLaVA-NeXT directory: no proxyv keys
        tiny_llava_next()[0].save_pretrained(src)
    else:
        official_checkpoint(src, learn_proxy=False)
        if damage == "missing":
            weights = load_file(str(src / "model.safetensors"))
            del weights["model.vision_mlp_layers.1.proj.2.weight"]
            save_file(weights, str(src / "model.safetensors"))
        else:
            config = json.loads((src / "config.json").read_text())
            (src / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    result = convert(src, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out" / "model").exists()
