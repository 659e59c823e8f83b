"""Convert a checkpoint of the official ProxyV code (penghao-wu/ProxyV, a LLaVA-NeXT fork) into a
transformers LLaVA-NeXT model directory and an lmmsqueeze ProxyV adapter.

The weights and the ProxyV layer are converted exactly: the Llama LLM, the CLIP tower, the mlp2x_gelu
projector and ``image_newline`` keep their values; ``vision_mlp_layers.I.{context_proj, input_proj,
proj.0, proj.2, layernorm_post}`` become the adapter's ``mlps.I.{context_proj, input_proj, fuse,
out_proj, norm}`` and ``proxyv_initializer.{Wk, proxyv_tokens}`` its ``initializer.{key, queries}``.

The image layout is not the official one, so answers can differ from the official code's:
transformers' LLaVA-NeXT unpads the sub-crop grid and puts a newline after every row, while the
official code concatenates whole crops (no unpadding) with one newline per crop (and leaves the
sub-crop newlines' positions unshifted). lmmsqueeze also sees LLaVA-NeXT's sub-crops as one grid,
so non-spatial proxies are made for the base crop and for the sub-crop grid, not for every crop.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.utils import logging as hf_logging

from ..compose import compile_pipeline
from ..errors import ModelError
from ..models import geometry_of
from .modules import ProxyVAdapter, ProxyVConfig

TOWER = "model.vision_tower.vision_tower.vision_model."  # the official CLIP tower's weights
MLP_NAMES = {"context_proj.weight": "context_proj.weight", "input_proj.weight": "input_proj.weight",
             "proj.0.weight": "fuse.weight", "proj.2.weight": "out_proj.weight",
             "layernorm_post.weight": "norm.weight"}
INIT_NAMES = {"Wk.weight": "key.weight", "proxyv_tokens": "queries"}
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")
IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")  # buffers older transformers saved
#: the released checkpoint's prompt format (the official conversation template "v1", Vicuna)
VICUNA_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. {% for m in messages %}"
    "{{ 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{{ ' ' if m['role'] == 'user' else '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
Say = Callable[[str], None]


def convert_official(src: str | Path, out: str | Path, vision_config: str | Path | None = None,
                     say: Say | None = None) -> tuple[Path, Path]:
    """Write ``out/model`` (LLaVA-NeXT: config, safetensors, a processor when ``src`` has a tokenizer)
    and ``out/adapter`` (the ProxyV adapter, recording its lmmsqueeze pipeline). ``vision_config``: a CLIP
    config directory for a tower that is neither local nor cached (else the weights' shapes give it).
    ``say`` gets notes on what was assumed. Raises :class:`ModelError` naming the problem."""
    src, out, say = Path(src), Path(out), say or (lambda _: None)
    cfg = _read_config(src)
    for sub in ("model", "adapter"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise ModelError(f"{str(out / sub)!r} is not empty; remove it or choose another OUT")
    weights = _read_weights(src)
    if not any(k.startswith("model.vision_mlp_layers.") for k in weights):
        raise ModelError(f"{str(src)!r} is not a ProxyV checkpoint: it has no model.vision_mlp_layers.* "
                         "weights; convert the fine-tuned checkpoint, not a projector-only one")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _convert(src, out, cfg, weights, vision_config, say)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _convert(src: Path, out: Path, cfg: dict, weights: dict[str, Tensor], vision_config: Any,
             say: Say) -> tuple[Path, Path]:
    tokenizer = _tokenizer(src)
    vision = _vision_config(cfg, weights, vision_config, say)
    image_id = _image_token(tokenizer, weights, say)
    config = _llava_next_config(cfg, vision, image_id, weights["model.embed_tokens.weight"].shape[0], say)
    config.dtype = weights["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    renames = _model_renames(expected)
    text, start = config.text_config, int(cfg["proxyv_start_layer"])
    adapter_renames = [(f"model.vision_mlp_layers.{i}.{a}", f"mlps.{i}.{b}") for a, b in MLP_NAMES.items()
                       for i in range(text.num_hidden_layers - start)]
    adapter_renames += [("model.proxyv_initializer." + a, "initializer." + b) for a, b in INIT_NAMES.items()]
    mapped, adapter_weights = {}, {}
    for name, tensor in weights.items():
        if name.startswith(("model.vision_mlp_layers.", "model.proxyv_initializer.")):
            adapter_weights[_rename(name, adapter_renames)] = (name, tensor)
        elif not IGNORED.search(name):
            mapped[_rename(name, renames)] = (name, tensor)
    _check("model", mapped, expected, renames)
    model.load_state_dict({k: t for k, (_, t) in mapped.items()}, strict=True, assign=True)

    hidden, factor = text.hidden_size, int(cfg.get("proxyv_reduce_factor", 4))
    variant = "nonspatial" if cfg.get("learn_proxy") else "spatial"
    side = vision.image_size // vision.patch_size
    proxies = max(int(cfg.get("per_crop_token_len", side * side)) // factor ** 2, 1)
    default = hidden // (4 if hidden >= 1024 else 2)  # the official width (hidden_size_reduce_factor)
    width = int(weights.get("model.vision_mlp_layers.0.context_proj.weight", torch.empty(default)).shape[0])
    pipeline = (f"proxyv(layer={start}, variant={variant}, factor={factor}, proxies={proxies}, "
                f"mlp_hidden={0 if width == default else width})")
    model_dir, adapter_dir = out / "model", out / "adapter"
    pconfig = ProxyVConfig(
        layer=start, variant=variant, factor=factor, proxies=proxies, hidden_size=hidden, width=width,
        num_layers=text.num_hidden_layers, rms_norm_eps=float(text.rms_norm_eps), base_model=str(model_dir),
        pipeline=compile_pipeline(pipeline, geometry_of(config)).canonical)
    with torch.device("meta"):
        adapter = ProxyVAdapter(pconfig)
    _check("ProxyV", adapter_weights, {k: v.shape for k, v in adapter.state_dict().items()}, adapter_renames)
    adapter.load_state_dict({k: t for k, (_, t) in adapter_weights.items()}, strict=True, assign=True)

    model.save_pretrained(model_dir)
    if tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            say("the processor prompts as Vicuna v1 (the released checkpoint); else edit its chat template")
        _processor(config, tokenizer).save_pretrained(model_dir)
    adapter.save(adapter_dir)
    return model_dir, adapter_dir


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ModelError(f"{str(src)!r} has no config.json; pass an official ProxyV checkpoint's directory")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"cannot read {str(path)!r}: {exc}") from None
    if not cfg.get("proxyv") or "proxyv_start_layer" not in cfg:
        raise ModelError(f"{str(src)!r} is not a ProxyV checkpoint (its config.json lacks proxyv: true and "
                         "proxyv_start_layer); pass one of the official code's, trained with --proxyv true")
    if cfg.get("model_type", "llava_llama") != "llava_llama":
        raise ModelError(f"{str(src)!r} is a {cfg['model_type']!r} checkpoint; convert-proxyv converts the "
                         "official code's llava_llama (Vicuna, Llama) checkpoints only")
    return cfg


def _read_weights(src: Path) -> dict[str, Tensor]:
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{str(src)!r} holds no *.safetensors or pytorch_model*.bin weights")
    weights: dict[str, Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)) if f.suffix == ".safetensors"
                       else torch.load(f, map_location="cpu", weights_only=True))
    if "model.embed_tokens.weight" not in weights:
        raise ModelError(f"{str(src)!r} lacks model.embed_tokens.weight; the checkpoint is incomplete")
    return weights


def _tokenizer(src: Path) -> Any:
    if not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        with warnings.catch_warnings():  # it reads SRC's llava_llama config.json too
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer in {str(src)!r}: {str(exc).splitlines()[0]} "
                         "(a tokenizer.model needs `pip install sentencepiece`)") from None


def _image_token(tokenizer: Any, weights: dict[str, Tensor], say: Say) -> int:
    """The id of ``<image>`` (added to the tokenizer when missing); a new embedding row when it has none."""
    rows = weights["model.embed_tokens.weight"].shape[0]
    if tokenizer is None:
        image_id = rows
        say(f"SRC has no tokenizer: wrote the model only; its image token is the new id {image_id} "
            "(give '<image>' that id in the tokenizer you pair it with)")
    else:
        if "<image>" not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id > rows:
            raise ModelError(f"the tokenizer has {image_id} tokens but the embedding {rows} rows; "
                             "pair the checkpoint with its own tokenizer")
    if image_id == rows:  # the mean embedding (the image token's own embedding is never used)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in weights:
                w = weights[name]
                weights[name] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)])
    return image_id


def _llava_next_config(cfg: dict, vision: Any, image_id: int, rows: int, say: Say) -> Any:
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch") or cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ModelError("transformers' LLaVA-NeXT runs an mlp2x_gelu projector on one tower layer; "
                         f"this checkpoint has mm_projector_type={cfg.get('mm_projector_type', 'linear')!r}, "
                         f"mm_vision_select_feature={feature!r}")
    rope = dict(cfg.get("rope_scaling") or {})  # the legacy keys, as transformers 5 names them
    rope = {"rope_type": rope.pop("type", "default"), **rope, "rope_theta": float(cfg.get("rope_theta", 1e4))}
    text = LlamaConfig(**{k: cfg[k] for k in TEXT_KEYS if cfg.get(k) is not None}, rope_parameters=rope,
                       vocab_size=max(rows, image_id + 1), tie_word_embeddings=False)
    side = vision.image_size // vision.patch_size
    return LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
        image_grid_pinpoints=_pinpoints(cfg, vision.image_size, say), image_seq_length=side * side,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)), projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if feature == "patch" else "full", tie_word_embeddings=False)


def _vision_config(cfg: dict, weights: dict[str, Tensor], given: Any, say: Say) -> Any:
    """The tower's CLIP config: ``given``, else the local directory or cached hub model the checkpoint
    names, else the shape read off the weights (as OpenAI CLIP: 64-wide heads, quick_gelu)."""
    name = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    if TOWER + "embeddings.patch_embedding.weight" not in weights:
        raise ModelError(f"the checkpoint holds no CLIP tower weights ({TOWER}*; its tower is {name!r}); "
                         "convert-proxyv converts checkpoints that hold their CLIP tower")
    for where in (given, name):
        if not where:
            continue
        try:
            return CLIPVisionConfig.from_pretrained(str(where), local_files_only=True)
        except (OSError, ValueError) as exc:
            if where is given:
                message = str(exc).splitlines()[0]
                raise ModelError(f"cannot read a CLIP config in {str(given)!r}: {message}") from None
    patch = weights[TOWER + "embeddings.patch_embedding.weight"]  # [hidden, channels, p, p]
    positions = weights[TOWER + "embeddings.position_embedding.weight"].shape[0]  # patches + [CLS]
    layers = {k[len(TOWER):].split(".")[2] for k in weights if k.startswith(TOWER + "encoder.layers.")}
    hidden, heads = patch.shape[0], max(patch.shape[0] // 64, 1)
    say(f"the CLIP tower {name!r} is not here: its config was read off the weights, with {heads} heads "
        "and quick_gelu as OpenAI CLIP; pass --vision-config DIR if it differs")
    return CLIPVisionConfig(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=heads,
        intermediate_size=weights[TOWER + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        patch_size=patch.shape[-1], image_size=patch.shape[-1] * math.isqrt(positions - 1),
        num_channels=patch.shape[1], hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _pinpoints(cfg: dict, size: int, say: Say) -> list[list[int]]:
    """transformers' (height, width) pinpoints from the official (width, height) ones."""
    raw = cfg.get("image_grid_pinpoints")
    if not str(cfg.get("image_aspect_ratio", "anyres")).startswith("anyres"):
        say(f"the checkpoint was trained with image_aspect_ratio={cfg.get('image_aspect_ratio')!r} "
            "(one crop per image); LLaVA-NeXT adds anyres sub-crops")
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ModelError(f"cannot read image_grid_pinpoints={raw!r}; write [(w, h), ...]") from None
    return [[int(h), int(w)] for w, h in (raw or [(size, size)])]


def _model_renames(expected: dict[str, Any]) -> list[tuple[str, str]]:
    """Official prefix -> this transformers version's prefix (found from its own parameter names)."""
    def prefix(suffix: str) -> str:
        return next(k[:-len(suffix)] for k in expected if k.endswith(suffix))

    text, proj = prefix("embed_tokens.weight"), prefix("linear_1.weight")
    return [(TOWER, prefix("embeddings.patch_embedding.weight")),
            ("model.mm_projector.0.", proj + "linear_1."), ("model.mm_projector.2.", proj + "linear_2."),
            ("model.image_newline", prefix("image_newline") + "image_newline"),
            ("model.embed_tokens.", text + "embed_tokens."), ("model.layers.", text + "layers."),
            ("model.norm.", text + "norm."), ("lm_head.", prefix("lm_head.weight") + "lm_head.")]


def _rename(name: str, pairs: list[tuple[str, str]]) -> str:
    return next((new + name[len(old):] for old, new in pairs if name.startswith(old)), name)


def _check(kind: str, got: dict[str, Any], expected: dict[str, Any], renames: list[tuple[str, str]]
           ) -> None:
    """Every expected weight present with its shape, and nothing left over (named as in the checkpoint)."""
    missing = [_rename(k, [(b, a) for a, b in renames]) for k in expected if got.get(k) is None]
    if missing:
        raise ModelError(f"the checkpoint lacks {len(missing)} {kind} weight(s) its config.json implies, "
                         f"e.g. {missing[0]!r}; it is incomplete, or config.json does not describe it")
    extra = [name for k, (name, _) in got.items() if k not in expected]
    if extra:
        raise ModelError(f"the checkpoint has {len(extra)} {kind} weight(s) the converted model has no "
                         f"place for, e.g. {extra[0]!r}; its config.json does not describe these weights")
    for k, (name, tensor) in got.items():
        if tuple(tensor.shape) != tuple(expected[k]):
            raise ModelError(f"shape mismatch: {name!r} is {tuple(tensor.shape)} in the checkpoint, its "
                             f"config.json implies {tuple(expected[k])}; fix config.json or --vision-config")


def _processor(config: Any, tokenizer: Any) -> Any:
    s, vision = config.vision_config.image_size, config.vision_config
    images = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=getattr(tokenizer, "chat_template", None) or VICUNA_TEMPLATE)
